"""The ETL job on a real Spark standalone cluster (master + worker on 127.0.0.1, outside SLURM)."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.slurm_cluster import PYTHON, REPO, processes_mentioning, stop_processes, tiny_image_folder

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_home() -> Path:
    out = subprocess.run([str(PYTHON), "-c", "import os, pyspark; print(os.path.dirname(pyspark.__file__))"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


class Standalone:
    """A master and one worker started as our own children; stop() ends exactly those."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.props = workdir / "spark.properties"
        self.procs: list[subprocess.Popen] = []
        self.spark_home = _spark_home()
        self.env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_HOME": str(self.spark_home),
                    "PYSPARK_PYTHON": str(PYTHON), "SPARK_LOCAL_DIRS": str(workdir / "scratch"),
                    "SPARK_WORKER_DIR": str(workdir / "work")}

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen([str(self.spark_home / "bin" / "spark-class"), *args],
                                           stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))
        log.close()

    def start(self, timeout: float = 90) -> None:
        fd = os.open(self.props, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"spark.authenticate true\nspark.authenticate.secret {secrets.token_hex(32)}\n"
                    f"spark.master.rest.enabled false\nspark.ui.enabled false\n"
                    f"spark.pyspark.python {PYTHON}\n")
        self._spawn("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                    "--port", str(self.port), "--webui-port", "0", "--properties-file", str(self.props))
        self._spawn("worker", "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                    "--webui-port", "0", "--cores", "2", "--memory", "2g",
                    "--properties-file", str(self.props), self.url)
        deadline = time.monotonic() + timeout
        while "Registering worker" not in self.log("master"):
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                raise RuntimeError(f"standalone cluster did not come up:\n{self.log('master')[-2000:]}"
                                   f"\n{self.log('worker')[-2000:]}")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def submit(self, *args: str, with_secret: bool = True, timeout: float = 400):
        cmd = [str(self.spark_home / "bin" / "spark-submit"), "--master", self.url,
               "--conf", "spark.executor.memory=1g"]
        if with_secret:
            cmd += ["--properties-file", str(self.props)]
        return subprocess.run([*cmd, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def stop(self) -> None:
        stop_processes(self.procs, timeout=30)


@pytest.fixture
def standalone(tmp_path):
    cluster = Standalone(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    assert processes_mentioning(str(tmp_path)) == [], "a process of the standalone cluster survived"


def test_etl_on_a_standalone_cluster_with_authentication(standalone, tmp_path, spark):
    from etl.verify import verify_dataset

    images = tiny_image_folder(tmp_path / "images")
    out = tmp_path / "dataset"
    done = standalone.submit(str(REPO / "bigticket" / "__main__.py"), "etl", "prepare", "--source",
                             "imagenet-folder", "--input", str(images), "--out", str(out),
                             "--resize", "fixed:8", "--shards", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["records"] == 16
    assert manifest["splits"]["validation"]["records"] == 4
    assert verify_dataset(out, spark=spark).ok
    # The work really ran on the standalone worker (an executor was launched there), with auth on.
    assert "Asked to launch executor" in standalone.log("worker")
    assert "authentication enabled" in standalone.log("master").lower()
