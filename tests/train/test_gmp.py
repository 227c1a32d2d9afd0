"""Gradual magnitude pruning in real dense runs: masks on schedule, zeros after every batch,
bit-identical resume, mixed precision and loss-scale skipped steps."""
from __future__ import annotations

import os
import signal

import h5py
import numpy as np
import pytest

from common.atomic import read_json
from common.settings import make_settings
from train.gmp import current_masks, read_updates
from train.gmp_schedule import SparsitySchedule
from train.hooks import EpochHook
from train.interrupts import Interrupted, interrupts_raise
from train.run import train_dense
from train.settings import DenseSettings

GMP = {"model": "lenet_300_100", "epochs": 3, "batch_size": 64, "lr": 0.01, "augment": "none",
       "seed": 5, "gmp_schedule": "polynomial", "gmp_final_sparsity": 0.8,
       "gmp_end_step": 40, "gmp_frequency": 7, "gmp_exclude": ("logits",)}


def _settings(data, out, **extra):
    return make_settings(DenseSettings, {"data": str(data), "out": str(out), **GMP, **extra})


class ZeroCheck(EpochHook):
    """After every global step: pruned weights (mask 0) are exactly zero; masks never shrink."""

    def __init__(self, total_steps):
        self.pause_steps = frozenset(range(1, total_steps + 1))
        self.steps, self.sparsity, self.last = [], [], None

    def on_step(self, step, state):
        masks = current_masks(state.model)
        variables = {v.path: v for v in state.model.trainable_variables}
        for path, keep in masks.items():
            assert variables[path].dtype == "float32"
            assert not np.count_nonzero(variables[path].numpy()[~keep]), (step, path)
            if self.last is not None:
                assert not (keep & ~self.last[path]).any(), "a pruned weight came back"
        self.last = masks
        self.steps.append(step)
        self.sparsity.append(sum(int((~m).sum()) for m in masks.values()))


def _steps(run):
    return read_json(run.settings)["steps_per_epoch"]


@pytest.mark.parametrize("optimizer", ["adam"])
def test_gmp_run_prunes_on_schedule_with_zeros_after_every_batch(digits_dir, tmp_path, optimizer):
    settings = _settings(digits_dir, tmp_path, optimizer=optimizer)
    total = 3 * 22  # checked below against the run's own count
    check = ZeroCheck(total + 40)
    run = train_dense(settings, hooks=[check])
    spe = _steps(run)
    assert check.steps == list(range(1, 3 * spe + 1))
    schedule = SparsitySchedule("polynomial", 0.0, 0.8, 0, 40, 3.0, 7)
    updates = read_updates(run)
    assert [u["step"] for u in updates] == schedule.update_steps() == [0, 7, 14, 21, 28, 35, 40]
    pruned = [u["pruned"] for u in updates]
    assert pruned == sorted(pruned) and pruned[0] == 0
    total_weights = updates[-1]["total"]
    assert total_weights == 768 * 300 + 300 * 100  # logits excluded
    assert pruned[-1] == int(np.floor(0.8 * total_weights + 0.5))  # the final sparsity, exactly
    # Masks change only at update steps: the count between them is constant.
    for step, count in zip(check.steps, check.sparsity):
        last = schedule.last_update_at_or_before(step)
        assert count == pruned[schedule.update_steps().index(last)]
    # A dense-run directory: checkpoints, history with the sparsity column, masks readable by lottery.
    from lottery.prune.masks import load_mask
    mask, meta = load_mask(run.root / updates[-1]["mask_file"])
    assert meta["step"] == 40 and set(mask) == {"fc1/kernel", "fc2/kernel"}
    assert (run.checkpoints / "init.weights.h5").is_file() and (run.checkpoints / "final.weights.h5").is_file()
    history = (run.history).read_text().splitlines()
    assert "sparsity" in history[0] and float(history[-1].split(",")[history[0].split(",").index("sparsity")]) \
        == pytest.approx(pruned[-1] / total_weights)
    assert read_json(run.settings)["settings"]["gmp_schedule"] == "polynomial"
    import zipfile  # model.keras names Keras' own Adam: it loads without this project's code
    config = zipfile.ZipFile(run.model).read("config.json").decode()
    assert '"class_name": "Adam"' in config and "Gmp" not in config


class KillAt(EpochHook):
    """SIGTERM to this process after global step `step` (the run stops as from the shell)."""

    def __init__(self, step):
        self.pause_steps = frozenset({step})

    def on_step(self, step, state):
        os.kill(os.getpid(), signal.SIGTERM)


def _arrays(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
    return out


def test_a_killed_gmp_run_resumes_to_bit_identical_masks_and_weights(digits_dir, tmp_path):
    extra = dict(optimizer="sgd", momentum=0.9, gmp_end_step=50, gmp_frequency=9)
    whole = train_dense(_settings(digits_dir, tmp_path / "a", **extra))
    spe = _steps(whole)
    killed = _settings(digits_dir, tmp_path / "b", **extra)
    with pytest.raises(Interrupted):
        with interrupts_raise():
            train_dense(killed, hooks=[KillAt(spe + 10)])  # mid epoch 2, after updates 27 (> spe)
    run = train_dense(killed)
    assert [u["step"] for u in read_updates(run)] == [u["step"] for u in read_updates(whole)]
    a, b = _arrays(whole.checkpoint("final")), _arrays(run.checkpoint("final"))
    assert set(a) == set(b) and any("optimizer" in k for k in a)  # masks are optimizer variables
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for u, v in zip(read_updates(whole), read_updates(run)):
        assert u["pruned"] == v["pruned"]
        np.testing.assert_array_equal(np.load(whole.root / u["mask_file"])["fc1/kernel"],
                                      np.load(run.root / v["mask_file"])["fc1/kernel"])


def test_mixed_bfloat16_keeps_variables_float32_and_pruned_weights_zero(digits_dir, tmp_path):
    import keras

    class EpochZeros(EpochHook):
        nonzero = []

        def on_epoch_end(self, epoch, row, state):
            masks = current_masks(state.model)
            variables = {v.path: v for v in state.model.trainable_variables}
            self.nonzero.append(sum(int(np.count_nonzero(variables[p].numpy()[~m])) for p, m in masks.items()))
            assert all(v.dtype == "float32" for v in state.model.trainable_variables)
            return False

    hook = EpochZeros()
    try:
        run = train_dense(_settings(digits_dir, tmp_path, epochs=2, mixed_precision=True,
                                    optimizer="sgd", gmp_end_step=30), hooks=[hook])
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert hook.nonzero == [0, 0]
    assert read_updates(run)[-1]["step"] == 30
    rows = run.history.read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("skipped_steps")] == "0"


def test_a_loss_scale_skipped_step_is_counted_and_changes_nothing():
    """float16 with loss scaling on CPU: a batch with a non-finite gradient is skipped."""
    import keras

    from train.gmp import prune_to
    from train.local_engine import applied_steps
    from train.masked_optimizer import gmp_optimizer

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="a", activation="relu"),
                                  keras.layers.Dense(3, name="b", activation="softmax", dtype="float32")])
        model.compile(optimizer=gmp_optimizer(keras.optimizers.Adam(0.01)),
                      loss="sparse_categorical_crossentropy")
        assert type(model.optimizer).__name__ == "LossScaleOptimizer"
        model.optimizer.build(model.trainable_variables)
        prune_to(model, 0.5, "global")
        x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
        y = np.zeros(32, "int32")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 4 finite steps
        assert applied_steps(model) == 4
        before = [v.numpy().copy() for v in model.weights + model.optimizer.variables
                  if "iteration" not in v.path and "scale" not in v.path]
        bad = x.copy()
        bad[0, 0] = np.inf  # every gradient of this batch is non-finite
        model.fit(bad[:8], y[:8], batch_size=8, epochs=1, verbose=0)
        after = [v.numpy() for v in model.weights + model.optimizer.variables
                 if "iteration" not in v.path and "scale" not in v.path]
        assert applied_steps(model) == 4  # 5 batches, 1 skipped: the history's skipped_steps
        for b, a in zip(before, after):
            np.testing.assert_array_equal(a, b)
        masks = current_masks(model)
        kernels = {v.path: v.numpy() for v in model.trainable_variables}
        assert all(not np.count_nonzero(kernels[p][~m]) for p, m in masks.items())
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
def test_gmp_on_the_elephas_engine_updates_masks_between_rounds(digits_dir, spark, tmp_path):
    # 2 workers, 5-step rounds: rounds are cut at the update steps 0, 6, 12, 14 (end), the driver
    # prunes, and the next round ships the masks in the optimizer state.
    # Under mixed precision (bfloat16 compute on CPU): the driver's and the workers' variables stay
    # float32 (ZeroCheck), so the averaged weights and the shipped masks are float32 too.
    import keras

    settings = _settings(digits_dir, tmp_path, engine="elephas", workers=2, averaging=5, epochs=1,
                         optimizer="sgd", momentum=0.9, gmp_end_step=14, gmp_frequency=6,
                         mixed_precision=True)
    hook = ZeroCheck(15)
    hook.pause_steps = frozenset({6, 7, 12, 13, 14, 15})  # around the updates and at the end
    try:
        run = train_dense(settings, spark=spark, hooks=[hook])
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    updates = read_updates(run)
    assert [u["step"] for u in updates] == [0, 6, 12, 14]
    assert updates[-1]["pruned"] == int(np.floor(0.8 * updates[-1]["total"] + 0.5))
    assert hook.steps == [6, 7, 12, 13, 14, 15]
    # Pruned weights stayed zero through the workers' steps and the averaging (checked at 7, 13, 15).
    assert hook.sparsity[-1] == updates[-1]["pruned"]
    final = _arrays(run.checkpoint("final"))
    assert final and all(v.dtype == np.float32 for v in final.values() if v.dtype.kind == "f")


@pytest.mark.parametrize("extra, message", [
    (["--gmp-final-sparsity", "0.5"], "--gmp-final-sparsity: a GMP setting, but --gmp-schedule is 'none'"),
    (["--gmp-schedule", "polynomial", "--gmp-final-sparsity", "0.5", "--gmp-end-step", "999"],
     r"gmp.end.step: 999 is past the end of training \(46 steps\)"),
    (["--gmp-schedule", "polynomial", "--gmp-final-sparsity", "0.5", "--engine", "elephas",
      "--workers", "2", "--gmp-frequency", "7"], "gmp.frequency: mask updates at steps .* fall inside an epoch"),
    (["--gmp-schedule", "polynomial", "--gmp-final-sparsity", "0.2", "--gmp-initial-sparsity", "0.4"],
     "gmp.final.sparsity: 0.2 is below --gmp-initial-sparsity 0.4"),
])
def test_bad_gmp_flags_fail_before_training_naming_the_flag(digits_dir, tmp_path, capsys, extra, message):
    import re

    from bigticket.cli import main

    argv = ["train", "dense", "--data", str(digits_dir), "--out", str(tmp_path / "runs"),
            "--model", "lenet_300_100", "--epochs", "2", *extra]
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.cluster
def test_gmp_on_the_multiworker_engine_two_processes_agree_on_the_masks(digits_dir, tmp_path):
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from common.paths import DenseRunPaths

    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]}
    for s in socks:
        s.close()
    out = tmp_path / "runs"
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "BIGTICKET_LOG_LEVEL": "INFO",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        env.pop("SLURM_JOB_ID", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bigticket", "train", "dense", "--data", str(digits_dir), "--out",
             str(out), "--model", "lenet_300_100", "--epochs", "2", "--engine", "multiworker",
             "--optimizer", "adam", "--lr", "0.01", "--augment", "none", "--gmp-schedule", "polynomial",
             "--gmp-final-sparsity", "0.7", "--gmp-frequency", "3", "--gmp-end-step", "12",
             "--mixed-precision"],
            cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=900) for p in procs]
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr[-3000:]
        assert "mixed precision: mixed_bfloat16" in stderr   # bfloat16 compute on both workers
    run = DenseRunPaths(next(out.iterdir()))
    updates = read_updates(run)
    assert [u["step"] for u in updates] == [0, 3, 6, 9, 12]
    assert updates[-1]["pruned"] == int(np.floor(0.7 * updates[-1]["total"] + 0.5))
    final = _arrays(run.checkpoint("final"))
    mask = np.load(run.root / updates[-1]["mask_file"])
    kernels = {k: v for k, v in final.items() if k.startswith("layers/") and v.ndim == 2}
    # The chief's final weights are zero exactly where its last mask prunes (both workers
    # computed the same masks, or their mirrored updates would have revived weights).
    fc1 = [v for v in kernels.values() if v.shape == (768, 300)][0]
    assert not np.count_nonzero(fc1[~mask["fc1/kernel"]])
    by_shape = {v.shape: v for v in kernels.values()}   # 768x300, 300x100, 100x10: one each
    masked = sorted(k for k in mask.files if k != "__meta__")
    assert masked == ["fc1/kernel", "fc2/kernel", "logits/kernel"]
    assert sum(int(np.count_nonzero(by_shape[mask[k].shape][~mask[k]])) for k in masked) == 0
    # Trained under mixed precision (bfloat16 compute), the saved variables are float32.
    assert read_json(run.settings)["settings"]["mixed_precision"] is True
    assert all(v.dtype == np.float32 for v in final.values() if v.dtype.kind == "f")
