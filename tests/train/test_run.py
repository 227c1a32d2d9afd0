"""The dense driver end to end: real datasets, real Keras training, real subprocess kills."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from bigticket.cli import main
from common.paths import DenseRunPaths
from train.checkpoints import load_checkpoint
from train.data import make_dataset
from train.local_engine import compile_kwargs
from train.run import train_dense
from train.settings import DenseSettings

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "conv_small", "--model-option", "blocks=1", "--model-option", "width=0.125",
        "--model-option", "dense=16", "--batch-size", "64", "--lr", "0.05", "--augment", "crop",
        "--seed", "3"]


def _args(data, out, *extra):
    return ["train", "dense", "--data", str(data), "--out", str(out), *TINY, *extra]


def _weights(path):
    import h5py

    out = []
    with h5py.File(path, "r") as f:
        f["layers"].visititems(lambda name, obj: out.append((name, obj[()]))
                               if hasattr(obj, "shape") else None)
    return out


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert [n for n, _ in wa] == [n for n, _ in wb] and wa
    for (name, x), (_, y) in zip(wa, wb):
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.fixture(scope="module")
def local_run(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs-local")
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(_args(digits_dir, out, "--engine", "local", "--epochs", "3",
                        "--rewind", "0ep,3it,1ep"))
    assert rc == 0
    return DenseRunPaths(Path(buf.getvalue().strip().splitlines()[-1])), out


def test_local_run_writes_the_run_directory(local_run, digits):
    run, out = local_run
    assert run.root.parent == out and run.root.name.startswith("dense-")
    assert run.success.is_file() and not run.resume.exists()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "0ep.weights.h5", "1ep.weights.h5", "3it.weights.h5", "final.weights.h5", "init.weights.h5"]
    record = json.loads(run.settings.read_text())
    assert record["manifest_sha256"] == digits.manifest_sha256
    assert record["steps_per_epoch"] == 23  # ceil(1438 / 64)
    assert record["rewind_steps"] == {"0ep": 0, "3it": 3, "1ep": 23}
    assert record["settings"]["input_size"] == 16 and record["settings"]["format"] == "tfrecord"
    rows = list(csv.DictReader(run.history.open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "time_s"} <= set(rows[0])
    assert float(rows[0]["lr"]) == pytest.approx(0.05)  # cosine over 3 epochs
    assert float(rows[1]["lr"]) == pytest.approx(0.0375)
    assert float(rows[-1]["val_accuracy"]) > 0.3  # it learned something (10 classes)
    assert list(run.tensorboard.glob("events.out.tfevents.*"))
    _assert_same_weights(run.checkpoint("init"), run.checkpoint("0ep"))


def test_checkpoints_hold_the_weights_of_their_exact_step(local_run, digits):
    """Training 3 steps from the init checkpoint by hand gives the 3it checkpoint."""
    import keras

    run, _ = local_run
    model = load_checkpoint(run.root, "init")
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), **compile_kwargs())
    model.optimizer.build(model.trainable_variables)
    model.load_weights(run.checkpoint("init"))
    data = make_dataset(digits, "train", batch_size=64, training=True, input_size=16, seed=3,
                        epoch=0, augment="crop")
    for x, y in data.take(3):
        model.train_on_batch(x, y)
    at3 = load_checkpoint(run.root, "3it")
    for a, b in zip(model.get_weights(), at3.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    init = load_checkpoint(run.root, "init")
    assert any(not np.array_equal(a, b) for a, b in zip(init.get_weights(), at3.get_weights()))


def test_final_model_loads_with_safe_mode_and_matches_the_final_checkpoint(local_run):
    import keras

    run, _ = local_run
    model = keras.models.load_model(run.model, safe_mode=True)
    final = load_checkpoint(run.root, "final")
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(model(x), final(x), rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="no checkpoint '2ep'"):
        load_checkpoint(run.root, "2ep")


def test_a_finished_run_is_not_retrained(local_run, digits_dir, capsys):
    run, out = local_run
    before = {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file()}
    assert main(_args(digits_dir, out, "--engine", "local", "--epochs", "3",
                      "--rewind", "0ep,3it,1ep")) == 0
    assert capsys.readouterr().out.strip() == str(run.root)
    assert {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_weights(local_run, digits_dir,
                                                                      tmp_path):
    run, _ = local_run
    out = tmp_path / "runs"
    args = _args(digits_dir, out, "--engine", "local", "--epochs", "3", "--rewind", "0ep,3it,1ep")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "bigticket", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / run.root.name / "resume" / "state.json"
    deadline = time.monotonic() + 300
    try:
        while not (state.is_file() and json.loads(state.read_text())["epochs_done"] >= 1):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no epoch completed in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = DenseRunPaths(out / run.root.name)
    assert not killed.success.exists() and not killed.checkpoint("final").exists()
    done = json.loads(state.read_text())["epochs_done"]
    assert 1 <= done < 3

    assert main(args) == 0  # resumes in this process from the killed run's last epoch
    assert killed.success.is_file()
    for name in ("final", "1ep", "3it", "init"):
        _assert_same_weights(killed.checkpoint(name), run.checkpoint(name))
    rows = list(csv.DictReader(killed.history.open()))
    reference = list(csv.DictReader(run.history.open()))
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]


@pytest.mark.slow
def test_elephas_engine_rounds_stop_at_rewind_points(digits_dir, spark, tmp_path):
    settings = DenseSettings(data=str(digits_dir), out=str(tmp_path), model="conv_small",
                             model_options={"blocks": 1, "width": 0.125, "dense": 16},
                             engine="elephas", workers=2, averaging=5, epochs=1,
                             rewind=("3it", "1ep"), batch_size=64, lr=0.05, augment="crop")
    run = train_dense(settings, spark=spark)
    record = json.loads(run.settings.read_text())
    # 3 files over 2 workers: worker 0 has shards 0 and 2, the larger share, 15 batches of 64
    assert record["steps_per_epoch"] == 15
    assert record["rewind_steps"] == {"3it": 3, "1ep": 15}
    assert run.success.is_file()
    names = sorted(p.name.split(".")[0] for p in run.checkpoints.iterdir())
    assert names == ["1ep", "3it", "final", "init"]
    init, at3, final = (load_checkpoint(run.root, n).get_weights() for n in ("init", "3it", "final"))
    assert any(not np.array_equal(a, b) for a, b in zip(init, at3))
    assert any(not np.array_equal(a, b) for a, b in zip(at3, final))
    rows = list(csv.DictReader(run.history.open()))
    assert len(rows) == 1 and 0 <= float(rows[0]["val_accuracy"]) <= 1


@pytest.mark.parametrize("extra, message", [
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--rewind", "0ep,9ep"], r"rewind: 9ep is step 207, past the end of training \(46 steps"),
    (["--engine", "elephas", "--workers", "2", "--rewind", "5it"], "rewind: 5it: inside an epoch"),
    (["--format", "orc"], "invalid choice"),
    (["--lr", "-1"], "lr"),
])
def test_bad_input_fails_before_training(digits_dir, tmp_path, capsys, extra, message):
    argv = _args(digits_dir, tmp_path / "runs", "--engine", "local", "--epochs", "2") + extra
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_classes_that_do_not_match_the_model_and_broken_datasets_are_refused(
        digits_dir, digits_copy, tmp_path, capsys):
    config = tmp_path / "dense.yaml"
    config.write_text("num_classes: 5\nepochs: 1\n")
    assert main(_args(digits_dir, tmp_path / "runs", "--config", str(config))) == 2
    # named as the user gave it: the key and the file
    assert f"num_classes in {config}: the model is set for 5 classes but dataset" in capsys.readouterr().err
    (digits_copy / "_SUCCESS").unlink()
    assert main(_args(digits_copy, tmp_path / "runs", "--epochs", "1")) == 2
    assert f"{digits_copy / '_SUCCESS'}: missing" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
@pytest.mark.cluster
def test_multiworker_engine_trains_on_two_processes_and_only_the_chief_writes(
        digits, digits_dir, tmp_path):
    out = tmp_path / "runs"
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        env.pop("SLURM_JOB_ID", None)
        procs.append(subprocess.Popen(
            # Adversarial (PGD-2) batches: the multi-replica step's own attack hook runs too.
            [sys.executable, "-m", "bigticket", *_args(digits_dir, out, "--engine", "multiworker",
                                                       "--epochs", "2", "--rewind", "0ep,1ep",
                                                       "--adversarial", "pgd", "--adv-epsilon",
                                                       "0.05", "--adv-steps", "2")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr[-3000:]
    runs = list(out.iterdir())
    assert len(runs) == 1 and results[0][0].strip() == str(runs[0])
    run = DenseRunPaths(runs[0])
    assert run.success.is_file()
    record = json.loads(run.settings.read_text())
    # both workers step together: an epoch is the smaller worker's (file 1's) full global
    # batches of 2 x 64, each split into one 64-record step per worker
    expected = 2 * min(digits.steps("train", 128, w, 2, drop_remainder=True) for w in range(2))
    assert expected == 2 * (digits.shard_files("train")[1].records // 128)
    assert record["steps_per_epoch"] == expected
    assert sorted(p.name.split(".")[0] for p in run.checkpoints.iterdir()) == [
        "0ep", "1ep", "final", "init"]
    assert len(list(run.tensorboard.glob("events.out.tfevents.*"))) == 1  # the chief's only
    rows = list(csv.DictReader(run.history.open()))
    assert len(rows) == 2
    assert record["settings"]["adversarial"] == "pgd"
    for row in rows:  # top-5 from the custom loop and from the evaluation, 10 classes
        assert float(row["accuracy"]) <= float(row["top5_accuracy"]) <= 1.0
        assert float(row["val_accuracy"]) <= float(row["val_top5_accuracy"]) <= 1.0
