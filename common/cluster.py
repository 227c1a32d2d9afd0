"""The cluster environment, read in one place: rank, world size, local rank, GPUs.

Launchers disagree on variable names (MPICH's Hydra sets PMI_*, Open MPI sets OMPI_COMM_WORLD_*,
SLURM sets SLURM_*); callers ask here instead of reading the environment themselves.
"""
from __future__ import annotations

import dataclasses
import os


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
    gpus_per_node: int


def process_place(env: dict[str, str] | None = None) -> ProcessPlace:
    """Where this process sits among its peers, from the launcher's environment variables."""
    env = dict(os.environ if env is None else env)
    rank = _first_int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID") or 0
    size = _first_int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS") or 1
    local_rank = _first_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
    local_size = _first_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")
    gpus = _first_int(env, "BIGTICKET_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE")
    return ProcessPlace(
        rank=rank,
        size=size,
        local_rank=rank if local_rank is None else local_rank,
        local_size=size if local_size is None else local_size,
        gpus_per_node=4 if gpus is None else gpus,
    )


def pin_local_gpu(place: ProcessPlace | None = None) -> str | None:
    """Give this process one GPU by local rank; must run before TensorFlow is imported.

    Respects an allocation that already restricts CUDA_VISIBLE_DEVICES (SLURM's --gpus-per-task).
    Returns the device id chosen, or None on a CPU-only host.
    """
    place = place or process_place()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
        if not devices:
            return None
        chosen = devices[place.local_rank % len(devices)]
    else:
        if place.gpus_per_node <= 0:
            return None
        chosen = str(place.local_rank % place.gpus_per_node)
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen
