"""Network slimming (bn_l1) and the Early-Bird detector in dense training: real digits, a tiny
ResNet-20 (width 2), real Keras training, a real killed subprocess."""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
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
from common.presets import preset
from common.settings import settings_to_dict
from train.checkpoints import load_checkpoint
from train.cli import add_arguments, settings_from_args
from train.early_bird import bn_channel_mask, bn_gammas, bn_layers, hamming, read_masks
from train.local_engine import compile_kwargs, model_builder, optimizer_builder
from train.models import BATCHNORM_MODELS, MODELS, build_model
from train.run import run_hash
from train.run_files import read_history, record_identity
from train.settings import LATER_FIELD_DEFAULTS, DenseSettings
from train.spark_worker import WorkerSpec, build_compiled

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "resnet20", "--model-option", "width=2", "--batch-size", "64", "--lr", "0.1",
        "--lr-schedule", "constant", "--augment", "none", "--seed", "5", "--engine", "local"]
# Window 2 and a loose threshold: the ticket of this tiny run is drawn within a few epochs.
BIRD = ["--bn-l1", "5e-3", "--early-bird", "--early-bird-ratio", "0.5", "--early-bird-window",
        "2", "--early-bird-threshold", "0.3", "--stop-at-early-bird", "--epochs", "6",
        "--rewind", "1ep"]


def _args(data, out, *extra):
    return ["train", "dense", "--data", str(data), "--out", str(out), *TINY, *extra]


def _train(argv) -> DenseRunPaths:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(argv) == 0
    return DenseRunPaths(Path(buf.getvalue().strip().splitlines()[-1]))


def _gammas(model) -> np.ndarray:
    return np.concatenate([np.abs(g.numpy()) for _, g in bn_gammas(model)])


@pytest.fixture(scope="module")
def bird_run(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs-bird")
    return _train(_args(digits_dir, out, *BIRD)), out


# ------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("extra, message", [
    (["--model", "lenet_300_100", "--early-bird"], "--early-bird: model 'lenet_300_100' has no BatchNorm"),
    (["--model", "conv_small", "--bn-l1", "1e-4"], "--bn-l1: model 'conv_small' has no BatchNorm"),
    (["--early-bird", "--early-bird-ratio", "1.0"], "--early-bird-ratio: Input should be less than 1"),
    (["--early-bird", "--early-bird-ratio", "0"], "--early-bird-ratio: Input should be greater than 0"),
    (["--early-bird", "--early-bird-window", "1"], "--early-bird-window: Input should be greater than or equal to 2"),
    (["--stop-at-early-bird"], "--stop-at-early-bird: needs --early-bird"),
    (["--bn-l1", "-1"], "--bn-l1: Input should be greater than or equal to 0"),
    (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
])
def test_bad_early_bird_settings_fail_before_training(digits_dir, tmp_path, capsys, extra, message):
    rc = main(["train", "dense", "--data", str(digits_dir), "--out", str(tmp_path / "runs"),
               "--model", "resnet20", "--epochs", "2", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_preset_values_are_overridden_by_flags(digits_dir):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["dense", "--preset", "early-bird-resnet20", "--data", str(digits_dir),
                              "--epochs", "12", "--rewind", "2ep", "--early-bird-window", "3",
                              "--lr-decay-epochs", "6,9"])
    s = settings_from_args(args)
    expected = preset("early-bird-resnet20", "dense")
    assert (s.model, s.bn_l1, s.early_bird, s.lr, s.lr_schedule) == (
        expected["model"], expected["bn_l1"], True, expected["lr"], expected["lr_schedule"])
    assert (s.epochs, s.rewind, s.early_bird_window, s.lr_decay_epochs) == (12, ("2ep",), 3, (6, 9))
    assert s.data == str(digits_dir)


def test_new_fields_at_their_defaults_keep_old_run_identities(digits):
    s = DenseSettings(data="/d", model="resnet20", input_size=16, format="tfrecord", num_classes=10)
    # In the JSON form the identity hashes (tuples are lists there).
    assert {k: settings_to_dict(s)[k] for k in LATER_FIELD_DEFAULTS} == LATER_FIELD_DEFAULTS
    # A settings record written before the fields existed matches today's record of the same run.
    new = {"settings": settings_to_dict(s), "steps_per_epoch": 3}  # as settings.json holds it
    old = {"settings": {k: v for k, v in new["settings"].items() if k not in LATER_FIELD_DEFAULTS},
           "steps_per_epoch": 3}
    assert record_identity(old) == record_identity(new)
    assert run_hash(dataclasses.replace(s, bn_l1=1e-4), digits) != run_hash(s, digits)
    assert run_hash(dataclasses.replace(s, early_bird=True), digits) != run_hash(s, digits)


def test_batchnorm_registry_matches_the_built_models():
    import keras

    small = {"mobilenet_v2": {"alpha": 0.35}, "conv_small": {"blocks": 1, "width": 0.125, "dense": 4},
             **{n: {"width": 1} for n in ("resnet20", "resnet44", "resnet56")}}
    for name in MODELS:
        model = build_model(name, 3, 8, **small.get(name, {}))
        assert bool(bn_layers(model)) == (name in BATCHNORM_MODELS), name
        keras.backend.clear_session()


# ---------------------------------------------------------------------------------------- bn_l1
def test_the_worker_model_path_carries_the_penalty_into_the_training_loss():
    """Elephas workers build `local_engine.model_builder` after a cloudpickle round trip and train
    with train_on_batch: the loss they minimise is the data loss + bn_l1 * sum |gamma|."""
    import keras
    from pyspark import cloudpickle

    s = DenseSettings(data="/d", model="resnet20", model_options={"width": 1}, input_size=8,
                      format="tfrecord", num_classes=10, seed=1, bn_l1=0.01)
    x = np.random.default_rng(0).uniform(0, 255, (8, 8, 8, 3)).astype("float32")
    y = np.arange(8) % 10
    spec = WorkerSpec(model_factory=model_builder(s, 10), optimizer_factory=optimizer_builder(s),
                      compile_kwargs=compile_kwargs(), dataset_factory=None, num_workers=1)
    model = build_compiled(cloudpickle.loads(cloudpickle.dumps(spec)))
    assert len(model.losses) == len(_gammas_layers(model)) > 0
    # the data term of the first step, on the same (initial) weights, in training mode
    data_loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))))
    channels = _gammas(model).size  # gammas start at 1: the penalty is 0.01 * channels
    step_loss = model.train_on_batch(x, y, return_dict=True)["loss"]
    assert step_loss - data_loss == pytest.approx(0.01 * channels, rel=1e-3)


def _gammas_layers(model):
    return bn_layers(model)


def test_bn_l1_shrinks_the_gammas_and_the_model_still_loads_with_safe_mode(bird_run, digits_dir,
                                                                           tmp_path):
    import keras

    run, _ = bird_run
    # The same seed, data and first epoch without the penalty (and without the detector).
    plain = _train(_args(digits_dir, tmp_path / "runs", "--epochs", "1", "--rewind", "1ep"))
    with_l1, without = _gammas(load_checkpoint(run.root, "1ep")), _gammas(load_checkpoint(plain.root, "1ep"))
    assert with_l1.size == without.size
    assert with_l1.mean() < without.mean() and np.median(with_l1) < np.median(without)
    assert (with_l1 < without).mean() > 0.5  # most channels, not a few outliers

    model = keras.models.load_model(run.model, safe_mode=True)
    assert len(model.losses) == len(_gammas_layers(model))  # the penalty survives save/load
    final = load_checkpoint(run.root, "final")
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(model(x), final(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- Early-Bird
def test_the_ticket_is_drawn_recorded_and_training_stops_there(bird_run):
    run, _ = bird_run
    assert run.success.is_file() and run.model.is_file() and not run.resume.exists()
    record = json.loads(run.early_bird.read_text())
    assert (record["ratio"], record["window"], record["threshold"]) == (0.5, 2, 0.3)
    drawn = record["drawn_epoch"]
    assert isinstance(drawn, int) and 2 <= drawn < 6
    assert record["checkpoint"] == "early_bird" and record["stopped_early"] is True
    # training ended at the drawn epoch, and the run is complete there
    assert [r["epoch"] for r in read_history(run)] == list(range(1, drawn + 1))
    assert [e["epoch"] for e in record["epochs"]] == list(range(1, drawn + 1))

    masks = read_masks(run.early_bird_masks)
    assert sorted(masks) == list(range(1, drawn + 1))
    assert sum(c for _, c in record["bn_layers"]) == masks[1].size
    assert all((~m).sum() == round(0.5 * m.size) for m in masks.values())
    # distances recomputed from the saved masks, and drawn at the first one under the threshold
    distances = [None] + [hamming(masks[e], masks[e - 1]) for e in range(2, drawn + 1)]
    assert [e["distance"] for e in record["epochs"]] == pytest.approx(distances)
    assert all(d >= 0.3 for d in distances[1:-1]) and distances[-1] < 0.3


def test_the_early_bird_checkpoint_holds_the_drawn_epoch_weights(bird_run):
    run, _ = bird_run
    drawn = json.loads(run.early_bird.read_text())["drawn_epoch"]
    bird = load_checkpoint(run.root, "final")
    bird.load_weights(str(run.checkpoint("early_bird")))  # strict: same architecture
    final = load_checkpoint(run.root, "final")  # stopped right at the ticket
    for a, b in zip(bird.get_weights(), final.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(bn_channel_mask(bird, 0.5), read_masks(run.early_bird_masks)[drawn])


def test_load_checkpoint_opens_the_early_bird_checkpoint(bird_run):
    run, _ = bird_run
    bird, final = load_checkpoint(run.root, "early_bird"), load_checkpoint(run.root, "final")
    for a, b in zip(bird.get_weights(), final.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_finished_run_is_not_retrained(bird_run, digits_dir):
    run, out = bird_run
    before = {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file()}
    assert _train(_args(digits_dir, out, *BIRD)).root == run.root
    assert {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_killed_run_resumes_the_detector_exactly(bird_run, digits_dir, tmp_path):
    run, _ = bird_run
    out = tmp_path / "runs"
    argv = _args(digits_dir, out, *BIRD)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "bigticket", *argv], cwd=REPO, env=env,
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
    assert not killed.success.exists()
    done = json.loads(state.read_text())["epochs_done"]
    drawn = json.loads(run.early_bird.read_text())["drawn_epoch"]
    assert 1 <= done < drawn, "killed after the ticket was drawn: nothing left to resume"
    assert json.loads(killed.early_bird.read_text())["drawn_epoch"] is None

    assert _train(argv).root == killed.root  # resumes in this process
    assert killed.success.is_file()
    assert json.loads(killed.early_bird.read_text()) == json.loads(run.early_bird.read_text())
    a, b = read_masks(killed.early_bird_masks), read_masks(run.early_bird_masks)
    assert sorted(a) == sorted(b)
    for epoch in a:
        np.testing.assert_array_equal(a[epoch], b[epoch])
    for name in ("early_bird", "final"):
        wa, wb = _h5_arrays(killed.checkpoint(name)), _h5_arrays(run.checkpoint(name))
        assert len(wa) == len(wb) > 0
        for x, y in zip(wa, wb):
            np.testing.assert_array_equal(x, y)


def _h5_arrays(path) -> list:
    import h5py

    out = []
    with h5py.File(path) as f:
        f["layers"].visititems(lambda n, o: out.append(o[()]) if hasattr(o, "shape") else None)
    return out


def test_cifar_resnets_take_a_batchnorm_momentum_for_tiny_datasets():
    import keras

    def momenta(model):
        return {l.momentum for l in model.layers if isinstance(l, keras.layers.BatchNormalization)}

    assert momenta(build_model("resnet20", 10, 8, width=1)) == {0.99}  # Keras' default: old runs
    assert momenta(build_model("resnet20", 10, 8, width=1, bn_momentum=0.9)) == {0.9}
    with pytest.raises(ValueError, match="bn_momentum"):
        build_model("resnet20", 10, 8, width=1, bn_momentum=1.0)


@pytest.mark.slow
@pytest.mark.cluster
def test_multiworker_workers_train_with_the_penalty_and_stop_together(digits_dir, tmp_path):
    """Every worker runs the detector on the same mirrored weights, so all stop at the ticket
    together (a worker that kept training would hang the collectives); only the chief writes."""
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]}
    for s in socks:
        s.close()
    out = tmp_path / "runs"
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        env.pop("SLURM_JOB_ID", None)
        argv = _args(digits_dir, out, "--bn-l1", "5e-3", "--early-bird", "--early-bird-window",
                     "2", "--early-bird-threshold", "0.3", "--stop-at-early-bird", "--epochs",
                     "4", "--engine", "multiworker")
        procs.append(subprocess.Popen([sys.executable, "-m", "bigticket", *argv], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr[-3000:]
    run = DenseRunPaths(Path(results[0][0].strip().splitlines()[-1]))
    assert run.success.is_file()
    record = json.loads(run.early_bird.read_text())
    drawn = record["drawn_epoch"]
    assert drawn is not None and record["stopped_early"] == (drawn < 4)
    assert len(read_history(run)) == drawn  # both workers stopped at the ticket
    assert "ticket drawn" in results[1][1]  # the other worker saw the same ticket
