"""The GPU path without a GPU: every launcher binds devices on a fake 4-GPU node as on a real one.

The fake node is a fake `nvidia-smi` on PATH (answering the queries bigticket makes as the real one
does) and, for SLURM, a real slurmd whose gres.conf names four GPU device files, so SLURM itself
sets CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS, SLURM_LOCALID... Each case checks, in each worker
process, the CUDA_VISIBLE_DEVICES TensorFlow starts with: 4 workers, 4 distinct GPUs, each
worker one GPU and no other. Covered: Spark task resources with the discovery script (real
local-cluster Spark and real Elephas rounds, with Python workers killed between rounds), MPI
local ranks (real mpiexec running the grid scheduler), SLURM --gpus-per-task, --gpus-per-node and
job arrays, `multiworker` (SLURM and TF_CONFIG), and the mixed-precision policy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.cluster import ProcessPlace, claim_gpus, local_gpus, node_gpus, tf_config_place
from lottery.grid.simulate import make_sleep_grid, sleep_point
from train.elephas_engine import DISCOVERY_SCRIPT

REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable)
MPIEXEC = PYTHON.parent / "mpiexec"
GPUS = ["0", "1", "2", "3"]
RECORDER = "tests.train.test_gpu_binding:record_device"

# What nvidia-smi 535 prints on a node of A100s (FAKE_GPU_COUNT of them, default 4) for the
# queries made by train/gpu_discovery.sh and common.cluster.node_gpus (--query-gpu=index) and by
# TensorFlow's SlurmClusterResolver (--list-gpus); it ignores CUDA_VISIBLE_DEVICES, as the real
# one does.
FAKE_NVIDIA_SMI = r"""#!/bin/sh
i=0
while [ "$i" -lt "${FAKE_GPU_COUNT:-4}" ]; do
  case "$*" in
    *--query-gpu=index,uuid*) printf '%s, GPU-5a4b3c2d-0000-4000-8000-00000000000%s\n' "$i" "$i" ;;
    *--query-gpu=index*) printf '%s\n' "$i" ;;
    *-L*|*--list-gpus*)
      printf 'GPU %s: NVIDIA A100-SXM4-40GB (UUID: GPU-5a4b3c2d-0000-4000-8000-00000000000%s)\n' "$i" "$i" ;;
    *) echo "fake nvidia-smi: no answer for: $*" >&2; exit 6 ;;
  esac
  i=$((i + 1))
done
"""


def _launcher_free_env() -> dict[str, str]:
    """This environment without anything a launcher or conftest set about ranks and devices."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "SLURM_", "PMIX_", "MPI_LOCAL", "BIGTICKET_GPU"))
           and k not in ("CUDA_VISIBLE_DEVICES", "TF_CONFIG")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture()
def gpu_node(tmp_path) -> dict[str, str]:
    """The environment of a process on a 4-GPU node no launcher has restricted."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(0o755)
    env = _launcher_free_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["BIGTICKET_GPU_LOCK_DIR"] = str(tmp_path / "gpu-claims")
    return env


def record_device(run_dir, grid_dir, task, settings, stop):
    """A grid executor (`--executor`): sleep_point's result plus the devices this rank was given
    and whether TensorFlow had started before they were."""
    result = dict(sleep_point(run_dir, grid_dir, task, settings, stop))
    result["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    result["pid"] = os.getpid()
    return result


def assert_one_distinct_gpu_each(devices: list[str | None], expected=GPUS):
    assert all(d is not None and "," not in d for d in devices), devices
    assert sorted(devices) == sorted(expected), devices


def _concurrent_devices(records: list[dict]) -> list[tuple[str, str]]:
    """(device, device) of every two points that ran at the same time in different processes."""
    pairs = []
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            if a["result"]["pid"] != b["result"]["pid"] and \
                    a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]:
                pairs.append((a["result"]["cuda_visible_devices"], b["result"]["cuda_visible_devices"]))
    return pairs


def _results(grid) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(grid.results.glob("*.json"))]


# -- the node's GPUs: one rule for the discovery script and for Python -------------------------

def _discover(env: dict[str, str]) -> list[str]:
    done = subprocess.run([str(DISCOVERY_SCRIPT)], env=env, capture_output=True, text=True,
                          check=True, timeout=30)
    found = json.loads(done.stdout)
    assert found["name"] == "gpu"
    return found["addresses"]


@pytest.mark.parametrize("visible", [None, "2,3", "", "NoDevFiles", "1, 3", "GPU-5a4b,MIG-77aa", "-1"])
def test_node_gpus_agrees_with_the_discovery_script(gpu_node, visible):
    env = dict(gpu_node)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    expected = {None: GPUS, "2,3": ["2", "3"], "": [], "NoDevFiles": [], "1, 3": ["1", "3"],
                "GPU-5a4b,MIG-77aa": ["GPU-5a4b", "MIG-77aa"], "-1": []}[visible]
    assert _discover(env) == expected
    assert node_gpus(env) == expected


def test_a_node_without_nvidia_smi_has_no_gpu(tmp_path):
    env = {**_launcher_free_env(), "PATH": f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    if any((Path(p) / "nvidia-smi").exists() for p in env["PATH"].split(os.pathsep)):
        pytest.skip("this host has an nvidia-smi")
    assert _discover(env) == [] and node_gpus(env) == []


def test_local_gpus_gives_every_process_of_a_node_its_own():
    def place(local_rank, local_size):
        return ProcessPlace(rank=local_rank, size=local_size, local_rank=local_rank,
                            local_size=local_size, gpus_per_node=None)

    assert [local_gpus(place(r, 4), GPUS) for r in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    # Shares: one worker alone keeps every GPU, two split them, four get one each.
    assert local_gpus(place(0, 1), GPUS, share=True) == GPUS
    assert [local_gpus(place(r, 2), GPUS, share=True) for r in range(2)] == [["0", "1"], ["2", "3"]]
    assert [local_gpus(place(r, 4), GPUS, share=True) for r in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    # More processes than GPUs: round-robin; a task SLURM bound to one GPU keeps it.
    assert [local_gpus(place(r, 8), GPUS)[0] for r in range(8)] == GPUS * 2
    assert local_gpus(place(3, 4), ["3"], share=True) == ["3"]
    assert local_gpus(place(0, 4), []) == []


def test_tf_config_place_counts_workers_on_the_same_host():
    cluster = {"chief": ["nodeA:2222"], "worker": ["nodeA:2223", "nodeB:2222", "nodeA:2224"]}

    def place(kind, index):
        return tf_config_place({"TF_CONFIG": json.dumps({"cluster": cluster,
                                                         "task": {"type": kind, "index": index}})})

    assert tf_config_place({}) is None
    assert [(p.rank, p.local_rank, p.local_size) for p in
            (place("chief", 0), place("worker", 0), place("worker", 1), place("worker", 2))] == \
        [(0, 0, 3), (1, 1, 3), (2, 0, 1), (3, 2, 3)]
    with pytest.raises(ValueError, match="TF_CONFIG"):
        place("evaluator", 0)


# -- claims: a live Python worker's GPU is never handed to another -----------------------------

_CLAIM = textwrap.dedent("""
    import sys, time
    from common.cluster import claim_gpus, node_gpus
    print(",".join(claim_gpus(sys.argv[1].split(","), node_gpus())), flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _claimer(env, assigned: str, hold: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(PYTHON), "-c", _CLAIM, assigned, str(hold)], env=env,
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_a_gpu_held_by_a_live_process_is_not_claimed_again(gpu_node):
    holders = [_claimer(gpu_node, "2", 60), _claimer(gpu_node, "3", 60)]
    try:
        assert [got for _, got in holders] == ["2", "3"]
        # A fresh worker assigned a held GPU takes a free one, the assigned free ones first.
        newcomer, got = _claimer(gpu_node, "2", 0)
        assert got == "0"
        newcomer.wait(timeout=30)
        pair, got = _claimer(gpu_node, "3,1", 0)
        assert got == "1,0"
        pair.wait(timeout=30)
        # The claim ends with its process: a killed holder's GPU is free at once.
        holders[0][0].kill()
        holders[0][0].wait(timeout=30)
        after, got = _claimer(gpu_node, "2", 0)
        assert got == "2"
        after.wait(timeout=30)
    finally:
        for proc, _ in holders:
            proc.kill()
            proc.wait(timeout=30)


def test_when_every_gpu_is_held_the_assigned_one_is_shared(gpu_node, tmp_path):
    holders = [_claimer(gpu_node, g, 60) for g in GPUS]
    try:
        assert claim_gpus(["1"], GPUS, tmp_path / "other-claims") == ["1"]  # another folder: free
        extra, got = _claimer(gpu_node, "1", 0)
        assert got == "1"
        extra.wait(timeout=30)
    finally:
        for proc, _ in holders:
            proc.kill()
            proc.wait(timeout=30)


# -- MPI: the grid scheduler's ranks under real mpiexec ----------------------------------------

def _mpi_grid(tmp_path, env, ranks=4, points=8, duration=1.0):
    grid = make_sleep_grid(tmp_path, [duration] * points)
    cmd = [str(MPIEXEC), "-n", str(ranks), str(PYTHON), "-m", "mpi4py", "-m", "lottery", "run",
           "--grid", str(grid.root), "--executor", RECORDER]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TensorFlow was imported before the GPU was pinned" not in done.stderr
    return _results(grid)


def _device_by_rank(records) -> dict[int, str]:
    by_rank: dict[int, set] = {}
    for r in records:
        by_rank.setdefault(r["worker"]["rank"], set()).add(r["result"]["cuda_visible_devices"])
    assert all(len(devices) == 1 for devices in by_rank.values()), by_rank  # pinned once
    return {rank: devices.pop() for rank, devices in by_rank.items()}


@pytest.mark.cluster
@pytest.mark.slow
def test_mpi_ranks_pin_one_gpu_each_by_local_rank(gpu_node, tmp_path):
    # A node nvidia-smi describes: the ranks count its GPUs themselves.
    records = _mpi_grid(tmp_path / "smi", gpu_node)
    by_rank = _device_by_rank(records)
    assert sorted(by_rank) == [0, 1, 2, 3]
    assert_one_distinct_gpu_each(list(by_rank.values()))
    assert all(a != b for a, b in _concurrent_devices(records))
    # A 2-GPU node: four ranks share its two GPUs, two per GPU (never a GPU it does not have).
    records = _mpi_grid(tmp_path / "two", {**gpu_node, "FAKE_GPU_COUNT": "2"}, points=4, duration=0.5)
    assert all(device == str(rank % 2) for rank, device in _device_by_rank(records).items())
    # An allocation SLURM restricted to four other GPUs (--gpus-per-node=4 on a bigger node).
    records = _mpi_grid(tmp_path / "alloc", {**gpu_node, "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert_one_distinct_gpu_each(list(_device_by_rank(records).values()), ["4", "5", "6", "7"])


@pytest.mark.cluster
def test_mpi_ranks_on_a_cpu_node_pin_nothing(tmp_path):
    env = {**_launcher_free_env(), "PATH": f"{PYTHON.parent}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    records = _mpi_grid(tmp_path, env, ranks=2, points=2, duration=0.1)
    assert {r["result"]["cuda_visible_devices"] for r in records} == {None}


# -- multiworker under TF_CONFIG: four workers on one host -------------------------------------

_BIND = textwrap.dedent("""
    import json, os, sys
    from train.local_engine import bind_devices
    device = bind_devices("multiworker")
    print(json.dumps({"device": device, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                      "tensorflow": "tensorflow" in sys.modules}))
""")


def test_multiworker_workers_sharing_a_host_split_its_gpus(gpu_node):
    def run(hosts: list[str]) -> list[dict]:
        cluster = {"worker": [f"{h}:{2222 + i}" for i, h in enumerate(hosts)]}
        procs = [subprocess.Popen([str(PYTHON), "-c", _BIND], stdout=subprocess.PIPE, text=True,
                                  env={**gpu_node, "TF_CONFIG": json.dumps(
                                      {"cluster": cluster, "task": {"type": "worker", "index": i}})})
                 for i in range(len(hosts))]
        return [json.loads(p.communicate(timeout=60)[0]) for p in procs]

    four = run(["localhost"] * 4)
    assert not any(w["tensorflow"] for w in four)  # bound before TensorFlow starts
    assert_one_distinct_gpu_each([w["visible"] for w in four])
    # Two workers per host: two GPUs each; a worker alone on its host keeps all four.
    two = run(["nodeA", "nodeA", "nodeB"])
    assert [w["visible"] for w in two] == ["0,1", "2,3", "0,1,2,3"]


# -- Spark: task resources from the discovery script, real Elephas rounds ----------------------

_SPARK_JOB = textwrap.dedent('''
    """Elephas rounds on a local-cluster Spark whose one worker is a 4-GPU node."""
    import json, os, signal, sys, time
    import numpy as np
    from common.spark import get_spark
    from train.elephas_engine import DISCOVERY_SCRIPT, SparkDataParallel, gpu_spark_conf

    def model():
        import keras
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))

    def optimizer():
        import keras
        return keras.optimizers.SGD(0.01)

    def data(shard_files, worker_index, num_workers, seed):
        import tensorflow as tf
        x = np.random.default_rng(worker_index).normal(size=(32, 4)).astype("float32")
        return tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype("int64"))).repeat().batch(8)

    conf = {**gpu_spark_conf(gpus_per_executor=4, gpus_per_task=1),
            # the standalone worker (here inside local-cluster) offers the node's GPUs
            "spark.worker.resource.gpu.amount": "4",
            "spark.worker.resource.gpu.discoveryScript": str(DISCOVERY_SCRIPT),
            "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
            "spark.executorEnv.PYTHONPATH": os.environ["PYTHONPATH"]}
    spark = get_spark("gpu-binding", master="local-cluster[1,4,1024]", conf=conf)
    print(json.dumps({"executor_gpus": "ok"}), flush=True)
    dp = SparkDataParallel(spark, model, optimizer, {"loss": "sparse_categorical_crossentropy"},
                           data, 4, averaging_steps=1, gpus_per_task=1)
    weights, opt = dp.initial_state()
    rounds = int(sys.argv[1])
    for round_index in range(rounds):
        result = dp.run_round(weights, opt, lr=0.01, steps=1, round_index=round_index, seed=0)
        weights, opt = result.weights, result.optimizer_state
        workers = [{k: w[k] for k in ("worker_index", "pid", "gpu_assigned", "gpu_visible")}
                   for w in result.metrics["workers"]]
        print(json.dumps({"round": round_index, "workers": workers}), flush=True)
        if round_index < rounds - 1:  # kill two idle Python workers: Spark starts fresh ones
            for w in workers[:2]:
                os.kill(w["pid"], signal.SIGKILL)
            time.sleep(1)
    dp.close()
    spark.stop()
''')


@pytest.mark.cluster
@pytest.mark.slow
def test_elephas_tasks_get_distinct_gpus_from_spark_also_after_workers_die(gpu_node, tmp_path):
    script = tmp_path / "spark_gpu_job.py"
    script.write_text(_SPARK_JOB)
    env = {**gpu_node, "PYSPARK_PYTHON": str(PYTHON), "BIGTICKET_SPARK_LOG_LEVEL": "ERROR"}
    done = subprocess.run([str(PYTHON), str(script), "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rounds = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"round"')]
    assert len(rounds) == 2
    for r in rounds:
        workers = r["workers"]
        # Spark gave the four concurrent tasks the four addresses the discovery script found...
        assert sorted(w["gpu_assigned"] for w in workers) == GPUS, r
        # ...and the four live Python workers train on four different GPUs, even after two of
        # them were killed and replaced (a fresh one is often assigned a survivor's GPU).
        assert_one_distinct_gpu_each([w["gpu_visible"] for w in workers])
    assert len({w["pid"] for r in rounds for w in r["workers"]}) > 4  # workers were replaced


# -- SLURM: a real slurmd with four fake GPU devices -------------------------------------------

@pytest.fixture(scope="module")
def gpu_slurm(tmp_path_factory):
    from tests.cluster.slurm_cluster import SlurmCluster, SlurmUnavailable

    class FakeGpuSlurm(SlurmCluster):
        """The test cluster's node with 4 CPUs and 4 GPUs: gres.conf names four device files
        (links to /dev/null: slurmd wants character devices) and the configured CPUs are
        trusted (config_overrides), so four one-CPU tasks fit on this 2-core machine."""

        def write_conf(self) -> None:
            super().write_conf()
            devices = self.workdir / "dev"
            devices.mkdir(exist_ok=True)
            for i in range(4):
                (devices / f"nvidia{i}").unlink(missing_ok=True)
                (devices / f"nvidia{i}").symlink_to("/dev/null")
            text = self.conf.read_text()
            text = text.replace("ClusterName=", "GresTypes=gpu\nSlurmdParameters=config_overrides\n"
                                                "ClusterName=", 1)
            self.conf.write_text(text.replace(" State=UNKNOWN", " Gres=gpu:4 State=UNKNOWN", 1))
            (self.workdir / "gres.conf").write_text(f"Name=gpu File={devices}/nvidia[0-3]\n")

    cluster = FakeGpuSlurm(tmp_path_factory.mktemp("gpu-slurm"), cpus=4)
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no local SLURM cluster: {err}")
    yield cluster
    cluster.stop()


def _srun(cluster, args: list[str], code: str, timeout=240) -> list[dict]:
    env = {**cluster.env, **{k: v for k, v in _launcher_free_env().items() if k == "PYTHONPATH"}}
    env = {k: v for k, v in env.items() if k not in ("CUDA_VISIBLE_DEVICES", "TF_CONFIG")}
    done = subprocess.run(["srun", *args, str(PYTHON), "-c", code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
                  key=lambda d: d["task"])


_PIN = textwrap.dedent("""
    import json, os
    from common.cluster import pin_local_gpu, process_place
    before = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_LOCALID")}
    place = process_place()
    print(json.dumps({"task": place.rank, "local_rank": place.local_rank, "slurm": before,
                      "pinned": pin_local_gpu(place)}))
""")


@pytest.mark.cluster
@pytest.mark.slow
def test_slurm_gpus_per_task_binds_each_task_and_pinning_keeps_it(gpu_slurm):
    tasks = _srun(gpu_slurm, ["-n", "4", "--gpus-per-task=1"], _PIN)
    assert [t["task"] for t in tasks] == [0, 1, 2, 3]
    # SLURM gave each task one GPU of its own; pinning by local rank keeps exactly that one.
    assert_one_distinct_gpu_each([t["slurm"]["CUDA_VISIBLE_DEVICES"] for t in tasks])
    assert [t["pinned"] for t in tasks] == [t["slurm"]["CUDA_VISIBLE_DEVICES"] for t in tasks]
    assert [t["slurm"]["SLURM_STEP_GPUS"] for t in tasks] == [t["pinned"] for t in tasks]
    # --gpus-per-node / --gres: every task sees all four; the local rank picks one each.
    tasks = _srun(gpu_slurm, ["-n", "4", "--gres=gpu:4"], _PIN)
    assert {t["slurm"]["CUDA_VISIBLE_DEVICES"] for t in tasks} == {"0,1,2,3"}
    assert_one_distinct_gpu_each([t["pinned"] for t in tasks])


_RESOLVE = textwrap.dedent("""
    import json, os
    from train.local_engine import bind_devices, _slurm_resolver
    bound = bind_devices("multiworker")
    resolver = _slurm_resolver()
    spec = resolver.cluster_spec().as_dict()
    print(json.dumps({"task": int(resolver.task_id), "type": resolver.task_type,
                      "workers": len(spec.get("worker", [])), "bound": bound,
                      "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                      "accelerators": resolver.num_accelerators()}))
""")


@pytest.mark.cluster
@pytest.mark.slow
def test_slurm_multiworker_tasks_keep_their_own_gpu(gpu_slurm):
    # What slurm/train_multiworker.sbatch asks for: one task per GPU, four per node.
    tasks = _srun(gpu_slurm, ["--ntasks-per-node=4", "--gpus-per-task=1"], _RESOLVE, timeout=400)
    assert [(t["task"], t["type"], t["workers"]) for t in tasks] == [(i, "worker", 4) for i in range(4)]
    assert_one_distinct_gpu_each([t["visible"] for t in tasks])
    assert [t["bound"] for t in tasks] == [t["visible"] for t in tasks]
    # TensorFlow's resolver is told what the task sees (none here: the devices are fake).
    assert {json.dumps(t["accelerators"]) for t in tasks} == {json.dumps({"GPU": 0})}


@pytest.mark.cluster
@pytest.mark.slow
def test_slurm_lottery_scripts_give_every_rank_and_element_its_own_gpu(gpu_slurm, tmp_path):
    env = {"PYTHONPATH": str(REPO), "PYTHON": str(PYTHON)}
    # lottery_mpi.sbatch: mpiexec in a --gpus-per-node=4 allocation, one rank per GPU.
    grid = make_sleep_grid(tmp_path / "mpi", [1.0] * 8)
    done = gpu_slurm.sbatch(["--wait", "--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1",
                             "--gpus-per-node=4", "--output", str(tmp_path / "mpi-%j.out"),
                             str(REPO / "slurm" / "lottery_mpi.sbatch"), str(grid.root),
                             "--executor", RECORDER], env=env, cwd=REPO, timeout=300)
    logs = "".join(p.read_text() for p in tmp_path.glob("mpi-*.out"))
    assert done.returncode == 0, done.stderr + logs[-3000:]
    records = _results(grid)
    assert len(records) == 8
    assert_one_distinct_gpu_each(list(_device_by_rank(records).values()))
    # lottery_array.sbatch: four elements of --gpus=1 running at once, one GPU each.
    grid = make_sleep_grid(tmp_path / "array", [2.0] * 8)
    done = gpu_slurm.sbatch(["--wait", "--array=0-3", "--gpus=1", "--cpus-per-task=1",
                             "--output", str(tmp_path / "array-%A_%a.out"),
                             str(REPO / "slurm" / "lottery_array.sbatch"), str(grid.root),
                             "--executor", RECORDER], env=env, cwd=REPO, timeout=300)
    logs = "".join(p.read_text() for p in tmp_path.glob("array-*.out"))
    assert done.returncode == 0, done.stderr + logs[-3000:]
    records = _results(grid)
    assert len(records) == 8
    assert all(r["result"]["cuda_visible_devices"] in GPUS for r in records)
    concurrent = _concurrent_devices(records)
    assert concurrent and all(a != b for a, b in concurrent), concurrent


# -- mixed precision ---------------------------------------------------------------------------

def test_precision_policy_follows_the_training_devices():
    from train.local_engine import precision_policy

    assert precision_policy(False, ["CPU", "GPU"]) == "float32"
    assert precision_policy(True, ["CPU"]) == "mixed_bfloat16"
    assert precision_policy(True, ["CPU", "GPU"]) == "mixed_float16"
    assert precision_policy(True, ["/physical_device:CPU:0", "/physical_device:GPU:0"]) == "mixed_float16"
    assert precision_policy(True, []) == "mixed_bfloat16"


@pytest.fixture()
def float32_afterwards():
    import keras

    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_trains_in_bfloat16_on_this_cpu(float32_afterwards):
    import keras
    import numpy as np

    from train.local_engine import compile_kwargs, configure_tensorflow, model_builder, optimizer_builder
    from train.settings import DenseSettings

    s = DenseSettings(data="unused", model="conv_small", mixed_precision=True, input_size=16,
                      batch_size=8, optimizer="sgd", lr=0.01)
    configure_tensorflow(s)
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    model = model_builder(s, 10)()
    model.compile(optimizer=optimizer_builder(s)(), **compile_kwargs())
    assert {layer.dtype_policy.compute_dtype for layer in model.layers if layer.weights} >= {"bfloat16"}
    assert {v.dtype for v in model.trainable_variables} == {"float32"}
    x = np.random.default_rng(0).random((16, 16, 16, 3), dtype=np.float32)
    history = model.fit(x, np.arange(16) % 10, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert model.predict(x[:2], verbose=0).dtype == np.float32  # the softmax stays float32
    assert type(model.optimizer).__name__ != "LossScaleOptimizer"  # bfloat16 needs no loss scale


def test_a_driver_told_its_tasks_use_gpus_builds_their_state(float32_afterwards):
    """The elephas driver sees no GPU but must hold the state its GPU tasks train: float16 adds
    loss-scaling state to the optimizer, so the driver builds for its tasks' devices."""
    from train.local_engine import compile_kwargs, model_builder, optimizer_builder
    from train.settings import DenseSettings
    from train.spark_worker import WorkerSpec, build_compiled

    s = DenseSettings(data="unused", model="conv_small", mixed_precision=True, input_size=16,
                      optimizer="sgd")

    def state_layout(devices):
        spec = WorkerSpec(model_builder(s, 10, devices=devices), optimizer_builder(s),
                          compile_kwargs(), None, 1)
        model = build_compiled(spec)
        return model.dtype_policy.name, [v.path.split("/")[-1] for v in model.optimizer.variables]

    gpu_policy, gpu_state = state_layout(["GPU"])
    cpu_policy, cpu_state = state_layout(["CPU"])
    assert (gpu_policy, cpu_policy) == ("mixed_float16", "mixed_bfloat16")
    assert len(gpu_state) > len(cpu_state)  # a driver deciding from its own devices would differ
    assert state_layout(None)[1] == cpu_state  # this process has no GPU


def test_elephas_driver_builds_for_its_tasks_devices(spark, digits_dir, float32_afterwards):
    from train.engines import ElephasEngine
    from train.run import prepare_run
    from train.settings import DenseSettings

    s = DenseSettings(data=str(digits_dir), model="conv_small", engine="elephas", workers=1,
                      mixed_precision=True, epochs=1, batch_size=64)
    prepared = prepare_run(s)
    engine = ElephasEngine(prepared.settings, prepared.info, spark=spark)  # CPU tasks
    try:
        assert engine.model.dtype_policy.name == "mixed_bfloat16"
    finally:
        engine.close()

