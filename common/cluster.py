"""The cluster environment, read in one place: rank, world size, local rank, GPUs.

Launchers disagree on variable names (MPICH's Hydra sets PMI_*, Open MPI sets OMPI_COMM_WORLD_*,
SLURM sets SLURM_*, tf.distribute reads TF_CONFIG); callers ask here instead of reading the
environment themselves. A node's GPUs are found by the rule of train/gpu_discovery.sh (`node_gpus`).
Every binding is by CUDA_VISIBLE_DEVICES, set before TensorFlow starts: a process sees only its own
GPU(s).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

# What train/gpu_discovery.sh accepts as a GPU address: an index, or a GPU/MIG UUID.
_GPU_ADDRESS = re.compile(r"[0-9]+|(GPU|MIG)-[A-Za-z0-9-]+")


def _first_int(env: dict[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return None


@dataclasses.dataclass(frozen=True)
class ProcessPlace:
    rank: int
    size: int
    local_rank: int
    local_size: int
    gpus_per_node: int | None   # as the launcher states it; None: ask the node (node_gpus)


def process_place(env: dict[str, str] | None = None) -> ProcessPlace:
    """Where this process sits among its peers, from the launcher's environment variables."""
    env = dict(os.environ if env is None else env)
    rank = _first_int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID") or 0
    size = _first_int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS") or 1
    local_rank = _first_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
    local_size = _first_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")
    return ProcessPlace(
        rank=rank,
        size=size,
        local_rank=rank if local_rank is None else local_rank,
        local_size=size if local_size is None else local_size,
        gpus_per_node=_first_int(env, "BIGTICKET_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE"),
    )


def tf_config_place(env: Mapping[str, str] | None = None) -> ProcessPlace | None:
    """This worker's place in TF_CONFIG's cluster (chief first, then workers), or None without
    TF_CONFIG. Its local rank counts the tasks on the same host: the launcher there sets none."""
    env = os.environ if env is None else env
    text = env.get("TF_CONFIG")
    if not text:
        return None
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        tasks = [(kind, i, addr) for kind in ("chief", "worker")
                 for i, addr in enumerate(cluster.get(kind, []))]
        me = tasks.index(next(t for t in tasks if t[:2] == (task["type"], int(task["index"]))))
    except (ValueError, KeyError, TypeError, StopIteration) as err:
        raise ValueError(f"TF_CONFIG: no chief or worker task of its cluster is this task "
                         f"({type(err).__name__}: {err})") from None
    host = tasks[me][2].rsplit(":", 1)[0]
    same_host = [i for i, t in enumerate(tasks) if t[2].rsplit(":", 1)[0] == host]
    return ProcessPlace(rank=me, size=len(tasks), local_rank=same_host.index(me),
                        local_size=len(same_host),
                        gpus_per_node=_first_int(env, "BIGTICKET_GPUS_PER_NODE"))


def is_gpu_address(text: str) -> bool:
    return _GPU_ADDRESS.fullmatch(text) is not None


def node_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, by the rule of train/gpu_discovery.sh (tests hold them to
    the same answers): CUDA_VISIBLE_DEVICES when set (an allocation: SLURM sets it; set but
    empty means none), else every GPU nvidia-smi lists, else none. Anything but an index or a
    GPU/MIG UUID (SLURM's "NoDevFiles", "-1", error text) is not a GPU."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = env["CUDA_VISIBLE_DEVICES"].split(",")
    else:
        smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
        if smi is None:
            return []
        try:
            done = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=60, env=dict(env))
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("nvidia-smi failed (%s): no GPU assumed", err)
            return []
        ids = done.stdout.splitlines() if done.returncode == 0 else []
    ids = ["".join(i.split()) for i in ids]
    return [i for i in ids if is_gpu_address(i)]


def local_gpus(place: ProcessPlace, devices: Sequence[str], *, share: bool = False) -> list[str]:
    """The GPUs of its node's `devices` that belong to the process at `place`.

    One GPU by local rank (ranks beyond the GPU count share them round-robin); with share=True,
    an equal share of them, so a process alone on its node keeps them all (a multiworker worker
    mirrors over its local GPUs). Processes of one node never get overlapping shares.
    """
    devices = list(devices)
    if not devices:
        return []
    local_rank, local_size = place.local_rank, max(place.local_size, 1)
    if share and local_size < len(devices):
        per = len(devices) // local_size
        start = (local_rank % local_size) * per
        return devices[start:start + per]
    return [devices[local_rank % len(devices)]]


def pin_local_gpu(place: ProcessPlace | None = None, *, share: bool = False) -> str | None:
    """Give this process its GPU(s) by local rank (`local_gpus`); run before TensorFlow starts.

    The node's GPUs: an allocation that already restricts CUDA_VISIBLE_DEVICES (SLURM's
    --gpus-per-task or --gpus-per-node), else the count the launcher states
    (BIGTICKET_GPUS_PER_NODE, SLURM_GPUS_ON_NODE; 0 = none), else what nvidia-smi lists.
    Returns the CUDA_VISIBLE_DEVICES set (comma-separated), or None when the node has no GPU
    (then nothing is set).
    """
    place = place or process_place()
    if "CUDA_VISIBLE_DEVICES" in os.environ or place.gpus_per_node is None:
        devices = node_gpus()
    else:
        devices = [str(i) for i in range(max(place.gpus_per_node, 0))]
    mine = local_gpus(place, devices, share=share)
    if not mine:
        return None
    chosen = ",".join(mine)
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


# Descriptors of the claim files this process holds; closed only when the process exits.
_HELD_CLAIMS: dict[str, int] = {}


def gpu_claims_dir(env: Mapping[str, str] | None = None) -> Path:
    """The node-local folder of GPU claim files: BIGTICKET_GPU_LOCK_DIR, else one per user and
    SLURM job under the temporary folder (jobs sharing a node claim among their own GPUs)."""
    env = os.environ if env is None else env
    if env.get("BIGTICKET_GPU_LOCK_DIR"):
        return Path(env["BIGTICKET_GPU_LOCK_DIR"])
    return Path(tempfile.gettempdir()) / f"bigticket-gpus-{os.getuid()}-{env.get('SLURM_JOB_ID', 'nojob')}"


def claim_gpus(assigned: Sequence[str], node: Sequence[str], claims_dir: Path | None = None) -> list[str]:
    """Hold len(assigned) of the node's GPUs for the rest of this process's life, preferring
    `assigned`; returns the GPUs to make visible.

    For Spark's Python workers: Spark assigns a GPU address per task, but a reused worker keeps
    the GPU its TensorFlow started on, so once a worker dies and is replaced, the address its
    successor is given can be the GPU a surviving worker still trains on. A claim is an exclusive
    flock on <claims_dir>/gpu-<address>.lock, dropped by the kernel when the process exits: a GPU
    no live process holds is taken first (the assigned ones, then the node's others); when every
    GPU is held (more workers than GPUs, as with fractional task amounts), the assigned ones
    are shared.
    """
    assigned = [str(a) for a in assigned]
    if not assigned or not all(is_gpu_address(a) for a in assigned):
        return assigned
    claims_dir = Path(claims_dir) if claims_dir is not None else gpu_claims_dir()
    claims_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    got: list[str] = [a for a in assigned if a in _HELD_CLAIMS]
    for address in assigned + [g for g in node if g not in assigned and is_gpu_address(g)]:
        if len(got) == len(assigned):
            break
        if address in got:
            continue
        fd = os.open(claims_dir / f"gpu-{address}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _HELD_CLAIMS[address] = fd
        got.append(address)
    if len(got) < len(assigned):
        shared = [a for a in assigned if a not in got][:len(assigned) - len(got)]
        log.info("every GPU of this node is held by a live process: sharing %s", ",".join(shared))
        got += shared
    if set(got) != set(assigned):
        log.warning("GPU %s assigned by Spark is held by another live worker: using %s",
                    ",".join(assigned), ",".join(got))
    return got
