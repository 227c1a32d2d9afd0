"""Faults around elephas rounds, with real processes and real Spark: a Python worker SIGKILLed in
the middle of a round (training, or merging in the averaging tree) is retried by Spark and the
round's average is bit-identical to a fault-free round; a driver killed between rounds resumes
from its last epoch and ends with an uninterrupted run's weights; a round whose state cannot fit
the driver's Spark settings is refused in one line before any round runs."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from bigticket.cli import main
from common.paths import DenseRunPaths
from tests.train.test_elephas_engine import _write_shard
from tests.train.test_run import _assert_same_weights

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "conv_small", "--model-option", "blocks=1", "--model-option", "width=0.125",
        "--model-option", "dense=16", "--batch-size", "64", "--lr", "0.05", "--augment", "crop",
        "--seed", "3"]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": "", "BIGTICKET_LOG_LEVEL": "WARNING"}
    env.update(extra)
    return env


def _gone(pid: int) -> bool:
    """The process no longer runs (reaped, or a zombie awaiting its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    return {"a": _write_shard(root / "a.tfrecord", 96, rng),
            "b": _write_shard(root / "b.tfrecord", 32, rng)}


@pytest.mark.slow
def test_a_python_worker_killed_mid_round_is_retried_to_the_identical_average(shards, tmp_path):
    done = subprocess.run([sys.executable, "-m", "tests.train.elephas_fault_job", str(tmp_path),
                           shards["a"], shards["b"], "local[2,4]"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    # Spark saw real deaths (not Python exceptions) and retried the tasks.
    assert done.stderr.count("Python worker exited unexpectedly (crashed)") >= 2, done.stderr[-4000:]
    clean = np.load(tmp_path / "clean.npz")
    assert len(clean.files) > 4
    for case in ("train", "merge"):
        info = json.loads((tmp_path / f"{case}.json").read_text())
        assert info["killed_pid"] and _gone(info["killed_pid"]), case
        assert info["records"] == 3 * 4 * 16
        if case == "train":  # worker 1's report comes from the retry, in another Python worker
            assert info["killed_pid"] not in info["pids"]
        faulted = np.load(tmp_path / f"{case}.npz")
        assert faulted.files == clean.files
        for name in clean.files:
            np.testing.assert_array_equal(faulted[name], clean[name], err_msg=f"{case}: {name}")


def _elephas_args(data, out) -> list[str]:
    return ["train", "dense", "--data", str(data), "--out", str(out), *TINY, "--engine", "elephas",
            "--workers", "2", "--averaging", "5", "--master", "local[2]", "--epochs", "3",
            "--rewind", "0ep,3it,1ep"]


@pytest.mark.slow
def test_a_driver_killed_between_rounds_resumes_to_the_uninterrupted_weights(digits_dir, spark,
                                                                             tmp_path):
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(_elephas_args(digits_dir, tmp_path / "reference")) == 0
    reference = DenseRunPaths(Path(buf.getvalue().strip().splitlines()[-1]))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bigticket", *_elephas_args(digits_dir, out)],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    state = out / reference.root.name / "resume" / "state.json"
    deadline = time.monotonic() + 600
    try:
        while not (state.is_file() and json.loads(state.read_text())["epochs_done"] >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no epoch completed in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its JVM and its Python workers
    finally:
        proc.wait()
        proc.stderr.close()
    killed = DenseRunPaths(out / reference.root.name)
    assert not killed.success.exists()
    assert 1 <= json.loads(state.read_text())["epochs_done"] < 3

    assert main(_elephas_args(digits_dir, out)) == 0  # resumes from the last complete epoch
    assert killed.success.is_file()
    for name in ("final", "1ep", "3it", "init"):
        _assert_same_weights(killed.checkpoint(name), reference.checkpoint(name))


@pytest.mark.slow
def test_a_state_over_the_drivers_max_result_size_is_refused_before_any_round(digits_dir, tmp_path):
    """lenet_300_100 on 16x16x3 inputs with momentum: ~2 MiB of state per round, over a real
    local session's spark.driver.maxResultSize of 1m."""
    out = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "bigticket", "train", "dense", "--data", str(digits_dir), "--out",
         str(out), "--model", "lenet_300_100", "--engine", "elephas", "--workers", "2",
         "--master", "local[2]", "--epochs", "1"],
        cwd=REPO, env=_env(PYSPARK_SUBMIT_ARGS="--conf spark.driver.maxResultSize=1m pyspark-shell"),
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("bigticket")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("bigticket train dense: error: elephas: each round sends the driver")
    assert "spark.driver.maxResultSize=1m: set it to 4m or more" in errors[0]
    assert "Traceback" not in done.stderr and "OutOfMemoryError" not in done.stderr
    assert done.stdout == ""
    assert not list(out.glob("*/checkpoints/*"))  # refused before the init checkpoint
