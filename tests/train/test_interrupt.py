"""`bigticket train dense` as a user runs it: SIGTERM mid-training stops it with one line and
status 143, the same command resumes, and TensorFlow's native start-up lines stay quiet."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from train.interrupts import Interrupted, interrupts_raise, shielded

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "conv_small", "--model-option", "blocks=1", "--model-option", "width=0.125",
        "--model-option", "dense=16", "--batch-size", "64", "--augment", "crop", "--seed", "3"]
# What TensorFlow prints on a CPU host unless silenced (cuInit, CUDA plugin registration, ...).
NATIVE_NOISE = re.compile(r"cuInit|cuDNN|cuFFT|cuBLAS|Unable to register|absl::InitializeLog|"
                          r"oneDNN|cpu_feature_guard|computation placer")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _start(argv) -> tuple[subprocess.Popen, queue.Queue, list[str], threading.Thread]:
    proc = subprocess.Popen([sys.executable, "-m", "bigticket", *argv], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []

    def read():
        for line in proc.stderr:
            seen.append(line)
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, seen, reader


def _epochs_done(runs: Path) -> int:
    """Complete epochs in the resume state of the one run under `runs` (0 before there is one)."""
    for state in runs.glob("dense-*/resume/state.json"):
        try:
            return int(json.loads(state.read_text())["epochs_done"])
        except (ValueError, KeyError):  # being replaced (atomic rename) or not yet complete
            return 0
    return 0


@pytest.mark.slow
def test_sigterm_stops_with_one_line_and_status_143_then_the_same_command_resumes(
        digits_dir, tmp_path):
    argv = ["train", "dense", "--data", str(digits_dir), "--out", str(tmp_path / "runs"),
            "--engine", "local", "--epochs", "6", *TINY]
    proc, lines, seen, reader = _start(argv)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "".join(seen)[-3000:]
            continue
        if "epoch 1/6" in line:
            break
    # The epoch's line is logged before its resume state is written: signal once that is on disk,
    # so the stop comes after a complete epoch however slowly a loaded machine writes it.
    while not _epochs_done(tmp_path / "runs") and time.monotonic() < deadline:
        assert proc.poll() is None, "".join(seen)[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)   # not communicate(): the reader thread owns stderr
    out = proc.stdout.read()
    reader.join(timeout=30)
    err = "".join(seen)
    assert proc.returncode == 143, err[-3000:]
    stopped = re.findall(r"interrupted after epoch (\d+); re-run the same command to resume", err)
    assert len(stopped) == 1, err[-3000:]
    assert "Traceback" not in err and out == ""
    assert not NATIVE_NOISE.search(err), err[:3000]
    epochs_done = int(stopped[0])
    assert 1 <= epochs_done < 6

    again = subprocess.run([sys.executable, "-m", "bigticket", *argv], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after epoch {epochs_done}" in again.stderr       # resumed, not restarted
    assert not NATIVE_NOISE.search(again.stderr), again.stderr[:3000]
    run = Path(again.stdout.strip())
    assert (run / "_SUCCESS").is_file()
    assert len((run / "history.csv").read_text().strip().splitlines()) == 1 + 6


def _signal_after_first_epoch(argv, epochs: int) -> tuple[int, str]:
    proc, lines, seen, reader = _start(argv)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "".join(seen)[-3000:]
            continue
        if f"epoch 1/{epochs}" in line:
            break
    time.sleep(0.5)   # into the next Spark round: the signal lands in a JVM call
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=180)
    reader.join(timeout=30)
    return proc.returncode, "".join(seen)


@pytest.mark.slow
def test_sigterm_during_an_elephas_round_stops_spark_quietly(digits_dir, tmp_path):
    argv = ["train", "dense", "--data", str(digits_dir), "--out", str(tmp_path / "runs"),
            "--engine", "elephas", "--workers", "2", "--master", "local[2]", "--epochs", "8", *TINY]
    status, err = _signal_after_first_epoch(argv, 8)
    assert status == 143, err[-3000:]
    assert len(re.findall(r"interrupted after epoch \d+; re-run the same command to resume",
                          err)) == 1, err[-3000:]
    # neither Python's nor the JVM's traceback (RejectedExecutionException, cancelled jobs)
    assert "Traceback" not in err and "Exception" not in err and "\tat " not in err, err[-3000:]
    assert not NATIVE_NOISE.search(err), err[:3000]   # driver and executors alike


def test_a_signal_inside_a_shielded_write_waits_for_the_write_to_finish():
    before = signal.getsignal(signal.SIGTERM)
    steps = []
    with pytest.raises(Interrupted) as stop:
        with interrupts_raise():
            with shielded():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)            # the handler has run: it held the signal
                steps.append("written")     # so the write completes
                os.kill(os.getpid(), signal.SIGTERM)   # a second signal changes nothing
                time.sleep(0.05)
            steps.append("after")           # not reached: raised when the block ended
    assert steps == ["written"] and stop.value.exit_status == 143
    with pytest.raises(Interrupted) as stop:   # outside a shielded block: at once
        with interrupts_raise():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert stop.value.exit_status == 130
    assert signal.getsignal(signal.SIGTERM) is before   # handlers restored
