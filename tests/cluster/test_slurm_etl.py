"""slurm/etl.sbatch: a Spark standalone cluster inside a real SLURM allocation runs the ETL."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from tests.cluster.slurm_cluster import PYTHON, REPO, processes_mentioning, tiny_image_folder

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SCRIPT = REPO / "slurm" / "etl.sbatch"


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": str(PYTHON), "BIGTICKET_HOME": str(REPO),
           "SPARK_JOB_DIR": str(tmp_path / "job")}
    env.pop("SLURM_JOB_ID", None)
    done = subprocess.run(["bash", str(SCRIPT), "--source", "digits", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any("org.apache.spark.deploy.master.Master" in l for l in lines)
    assert any(l.startswith("+ srun") and "spark_worker.sh" in l for l in lines)
    submit = [l for l in lines if "spark-submit" in l]
    assert len(submit) == 1 and "--properties-file" in submit[0]
    assert "bigticket/__main__.py etl prepare --source digits" in submit[0]
    assert "secret " not in done.stdout  # the secret is never printed
    assert not (tmp_path / "out").exists() and not (tmp_path / "job").exists()


def _submit(slurm, tmp_path, *etl_args, **extra_env):
    env = {"SPARK_JOB_DIR": str(tmp_path / "sparkjob"), "SPARK_SCRATCH": str(tmp_path / "scratch"),
           "PYTHON": str(PYTHON), **extra_env}
    (tmp_path / "scratch").mkdir()
    return slurm.sbatch(["--wait", "--output", str(tmp_path / "job-%j.out"), str(SCRIPT), *etl_args],
                        env=env, cwd=REPO, timeout=400)


def test_etl_sbatch_writes_a_verified_dataset_and_stops_its_cluster(slurm, tmp_path, spark):
    from etl.verify import verify_dataset

    images = tiny_image_folder(tmp_path / "images")
    out = tmp_path / "dataset"
    # The master's port is held by another process (a shared node): Spark moves the master to the
    # next port, and the workers and the driver must follow it there.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _submit(slurm, tmp_path, "--source", "imagenet-folder", "--input", str(images),
                       "--out", str(out), "--resize", "fixed:8", "--shards", "2",
                       SPARK_MASTER_PORT=str(port))
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert done.returncode == 0, log[-4000:]
    assert f"port {port} was taken: the Spark master listens at spark://127.0.0.1:" in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["splits"]["train"]["records"], manifest["splits"]["validation"]["records"]) == (16, 4)
    assert verify_dataset(out, spark=spark).ok
    master_log = (tmp_path / "sparkjob" / "master.log").read_text()
    assert "Registering worker 127.0.0.1:" in master_log  # bound to the node's SLURM NodeAddr
    assert "authentication enabled" in master_log
    assert "Registering app bigticket-etl" in master_log
    # Stopped whatever the outcome: no process, no secret, no scratch left behind.
    assert processes_mentioning(str(tmp_path)) == []
    assert not (tmp_path / "sparkjob" / "spark.properties").exists()
    assert list((tmp_path / "scratch").iterdir()) == []


def test_a_failing_etl_still_stops_the_cluster(slurm, tmp_path):
    done = _submit(slurm, tmp_path, "--source", "imagenet-folder", "--input",
                   str(tmp_path / "missing"), "--out", str(tmp_path / "dataset"))
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert done.returncode != 0, log[-4000:]
    assert "Spark cluster stopped" in log
    assert processes_mentioning(str(tmp_path)) == []
    assert not (tmp_path / "sparkjob" / "spark.properties").exists()
