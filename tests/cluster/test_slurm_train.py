"""slurm/train_elephas.sbatch (Spark-in-SLURM, CPU) and slurm/train_multiworker.sbatch (two srun tasks
finding each other through SlurmClusterResolver) for real, and their dry runs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.cluster.slurm_cluster import PYTHON, REPO, processes_mentioning, tiny_image_folder

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _tiny_dataset(out: Path) -> None:
    images = tiny_image_folder(out.parent / "images")
    etl = subprocess.run([str(PYTHON), "-m", "bigticket", "etl", "prepare", "--source", "imagenet-folder",
                          "--input", str(images), "--out", str(out), "--resize", "fixed:8",
                          "--shards", "2", "--master", "local[1]"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert etl.returncode == 0, etl.stderr[-3000:]


def _finished_run(done, tmp_path: Path) -> tuple[str, Path]:
    """The job's log and the complete run directory it reported (asserting both)."""
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert done.returncode == 0, log[-4000:]
    run = Path((tmp_path / "run.txt").read_text().strip())
    assert run.parent == tmp_path / "runs" and run.name.startswith("dense-")
    assert (run / "_SUCCESS").is_file() and (run / "checkpoints" / "final.weights.h5").is_file()
    return log, run


def test_elephas_training_inside_slurm_saves_its_run_directory(slurm, tmp_path):
    _tiny_dataset(tmp_path / "ds")
    (tmp_path / "scratch").mkdir()
    env = {"SPARK_JOB_DIR": str(tmp_path / "sparkjob"), "SPARK_SCRATCH": str(tmp_path / "scratch"),
           "PYTHON": str(PYTHON), "RESULT_FILE": str(tmp_path / "run.txt")}
    done = slurm.sbatch(["--wait", "--gpus-per-node=0", "--nodes=1", "--output", str(tmp_path / "job-%j.out"),
                         str(REPO / "slurm" / "train_elephas.sbatch"), "--data", str(tmp_path / "ds"),
                         "--model", "conv_small", "--epochs", "1", "--out", str(tmp_path / "runs"),
                         "--workers", "2", "--batch-size", "4", "--input-size", "8"],
                        env=env, cwd=REPO, timeout=400)
    _, run = _finished_run(done, tmp_path)
    assert "Registering app bigticket-train" in (tmp_path / "sparkjob" / "master.log").read_text()
    assert processes_mentioning(str(tmp_path)) == []


def test_multiworker_training_inside_slurm_runs_one_process_per_task(slurm, tmp_path):
    _tiny_dataset(tmp_path / "ds")
    env = {"PYTHON": str(PYTHON), "RESULT_FILE": str(tmp_path / "run.txt")}
    done = slurm.sbatch(["--wait", "--gpus-per-task=0", "--nodes=1", "--ntasks-per-node=2",
                         "--cpus-per-task=1", "--output", str(tmp_path / "job-%j.out"),
                         str(REPO / "slurm" / "train_multiworker.sbatch"), "--data", str(tmp_path / "ds"),
                         "--model", "conv_small", "--epochs", "2", "--out", str(tmp_path / "runs"),
                         "--batch-size", "2", "--input-size", "8"],
                        env=env, cwd=REPO, timeout=400)
    log, run = _finished_run(done, tmp_path)
    # Both tasks joined one cluster (else each would train alone as a chief and both would write).
    assert log.count("dense run complete") == 1, log[-4000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run.name]


def test_multiworker_dry_run_is_one_srun_per_task(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": str(PYTHON), "BIGTICKET_HOME": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "slurm" / "train_multiworker.sbatch"), "--data", "d",
                           "--model", "resnet20", "--out", "runs"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"+ srun --kill-on-bad-exit=1 {PYTHON} -m bigticket train dense --engine multiworker "
        "--data d --model resnet20 --out runs"]


def test_elephas_dry_run_asks_for_gpus_on_gpu_nodes(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": str(PYTHON), "BIGTICKET_HOME": str(REPO),
           "GPUS_PER_NODE": "4", "SPARK_JOB_DIR": str(tmp_path / "job")}
    done = subprocess.run(["bash", str(REPO / "slurm" / "train_elephas.sbatch"), "--data", "d",
                           "--model", "resnet20", "--out", "runs"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "GPU resources: 4 per worker and executor, 1 per task" in done.stdout
    assert str(REPO / "train" / "gpu_discovery.sh") in done.stdout
    assert "train dense --engine elephas --workers 4 --data d" in done.stdout  # 1 node x 4 GPUs


def test_elephas_dry_run_prints_the_spark_submit_line(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": str(PYTHON), "BIGTICKET_HOME": str(REPO),
           "GPUS_PER_NODE": "0", "SPARK_JOB_DIR": str(tmp_path / "job"), "SPARK_MASTER_PORT": "7077",
           "RESULT_FILE": str(tmp_path / "run.txt")}
    env.pop("SLURM_JOB_ID", None)
    done = subprocess.run(["bash", str(REPO / "slurm" / "train_elephas.sbatch"), "--data", "d",
                           "--model", "resnet20", "--out", "runs"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    submit = [line for line in done.stdout.splitlines() if "train dense" in line]
    assert len(submit) == 1, done.stdout
    assert submit[0].startswith("+ ") and submit[0].split()[1].endswith("/bin/spark-submit"), submit
    assert ":7077 --properties-file " + str(tmp_path / "job" / "spark.properties") in submit[0]
    assert submit[0].endswith(f"{REPO}/bigticket/__main__.py train dense --engine elephas "
                              "--data d --model resnet20 --out runs")
    assert f"+ (last output line saved to {tmp_path / 'run.txt'})" in done.stdout
    assert not (tmp_path / "job").exists() and not (tmp_path / "run.txt").exists()
