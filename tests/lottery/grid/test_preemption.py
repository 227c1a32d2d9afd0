"""Preemption: a stopped point keeps its last complete epoch and a re-run resumes it exactly.

In-process with a tiny Keras model (the checkpoint itself), then under real `mpiexec` ranks and a
real single process on a real dense run (digits): SIGTERM to the launch's process group mid-point,
exit status 75, claims released, then a re-run that finishes every point once, resumed points
continuing at their saved epoch (each epoch's log line appears exactly once over both launches).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from common.atomic import read_json  # noqa: E402
from common.paths import GridPaths  # noqa: E402
from common.stop import Preempted, StopToken  # noqa: E402
from lottery.grid.plan import done_ids, load_plan, load_tasks  # noqa: E402
from lottery.points.epoch_checkpoint import EpochCheckpoint  # noqa: E402
from lottery.points.masked_training import train_masked  # noqa: E402
from lottery.prune import masks  # noqa: E402
from lottery.prune.stats import prunable_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
EXIT_PREEMPTED = 75
EPOCHS = 20     # per grid point: long enough to be caught mid-point, a few seconds each


# -- the checkpoint, in process ------------------------------------------------------------------
def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", name="fc")(x)
    x = keras.layers.Dropout(0.3, name="drop")(x)   # seed-generator state must be restored too
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(x))


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6, 6, 1)).astype(np.float32)
    return x, (x[:, :3].sum(axis=(1, 2, 3)) > 0).astype(np.int32)


def _train(checkpoint, stop_at_epoch=None, epochs=4):
    """Train the same tiny point; request a stop as epoch `stop_at_epoch` (0-based) begins, so
    the stop lands mid-epoch (after its first batch)."""
    model = _model()
    mask = masks.global_magnitude_mask(prunable_weights(model), 0.6)
    x, y = _data()
    stop = StopToken()

    def lr(epoch):
        if epoch == stop_at_epoch:
            stop.request()
        return 0.05 / (epoch + 1)

    history = train_masked(model, mask, (x, y), (x[:32], y[:32]), label="tiny",
                           optimizer=keras.optimizers.SGD(0.05, momentum=0.9), batch_size=16,
                           loss="sparse_categorical_crossentropy", epochs=epochs, learning_rate=lr,
                           checkpoint=checkpoint, stop=stop)
    return model, mask, history


def _without_time(history):
    return {k: v for k, v in history.items() if k != "time"}


def test_a_stopped_run_resumes_at_its_last_epoch_bit_identically(tmp_path, caplog):
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # as train_point's configure_tensorflow does
    reference, _, ref_history = _train(EpochCheckpoint(tmp_path / "ref", "tiny|m", seed=7))
    # A finished run keeps its last epoch: its owner clears it once the result is stored.
    assert json.loads((tmp_path / "ref" / "state.json").read_text())["epochs_done"] == 4

    state = tmp_path / "stopped"
    with pytest.raises(Preempted):
        _train(EpochCheckpoint(state, "tiny|m", seed=7), stop_at_epoch=2)
    saved = json.loads((state / "state.json").read_text())
    assert saved["epochs_done"] == 2 and len(saved["history"]["loss"]) == 2
    assert sorted(p.name for p in state.iterdir()) == ["epoch-00002.npz", "state.json"]

    checkpoint = EpochCheckpoint(state, "tiny|m", seed=7)
    caplog.clear()  # only the resumed launch's records (an earlier test may have enabled INFO)
    with caplog.at_level(logging.INFO, logger="lottery.points.masked_training"):
        resumed, mask, history = _train(checkpoint)
    assert checkpoint.resumed_from == 2
    trained = re.findall(r"tiny epoch (\d)/4", caplog.text)
    assert trained == ["3", "4"]                         # epochs 1-2 were not trained again
    assert _without_time(history) == _without_time(ref_history)
    for a, b in zip(resumed.variables, reference.variables):   # weights, BN stats, RNG state
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(resumed.optimizer.variables, reference.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert np.all(prunable_weights(resumed)["fc/kernel"][~mask["fc/kernel"]] == 0)
    assert json.loads((state / "state.json").read_text())["epochs_done"] == 4
    checkpoint.clear()
    assert not state.exists()


def test_state_of_another_run_is_not_resumed(tmp_path, caplog):
    with pytest.raises(Preempted):
        _train(EpochCheckpoint(tmp_path / "s", "point-a|m", seed=1), stop_at_epoch=1)
    other = EpochCheckpoint(tmp_path / "s", "point-b|m", seed=1)
    with caplog.at_level(logging.WARNING):
        _, _, history = _train(other, epochs=2)
    assert other.resumed_from == 0 and len(history["loss"]) == 2
    assert "starting from scratch" in caplog.text


def test_a_tampered_state_file_is_refused_with_its_field(tmp_path):
    with pytest.raises(Preempted):
        _train(EpochCheckpoint(tmp_path / "s", "k", seed=1), stop_at_epoch=1)
    path = tmp_path / "s" / "state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "arrays": "../../elsewhere.npz"}))
    with pytest.raises(ValueError, match="field arrays"):
        _train(EpochCheckpoint(tmp_path / "s", "k", seed=1))


def _recipe(epochs, stop: StopToken, stop_on_call=None):
    """A tiny recipe whose learning-rate hook requests `stop` on its `stop_on_call`-th call (the
    hook runs as each epoch starts, so the stop lands mid-epoch)."""
    from lottery.points.recipe import Recipe

    calls = []

    def lr(epoch):
        calls.append(epoch)
        if len(calls) == stop_on_call:
            stop.request()
        return 0.05

    x, y = _data()
    return Recipe(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="sparse_categorical_crossentropy", epochs=epochs, train_data=(x, y),
                  validation_data=(x[:32], y[:32]), learning_rate=lr, batch_size=16)


def test_an_imp_chain_resumes_inside_the_round_it_was_stopped_in(tmp_path, caplog):
    from lottery.points.imp import run_imp

    model = _model()
    start = model.get_weights()
    final = prunable_weights(model)

    def rewind():
        model.set_weights(start)
        return model

    def path(r):
        return tmp_path / "masks" / f"chain-r{r:02d}.npz"

    kwargs = dict(rounds=2, rate=0.5, mask_path=path, label="chain",
                  state_dir=tmp_path / "partial" / "chain", seed=3)
    stop = StopToken()
    with pytest.raises(Preempted):
        run_imp(rewind, final, _recipe(3, stop, stop_on_call=5), stop=stop, **kwargs)  # round 2, epoch 2
    assert "result" in masks.load_mask(path(1))[1]                    # round 1 complete
    assert json.loads((tmp_path / "partial" / "chain" / "state.json").read_text())["epochs_done"] == 1
    caplog.clear()
    stop = StopToken()
    with caplog.at_level(logging.INFO, logger="lottery.points.masked_training"):
        rounds = run_imp(rewind, final, _recipe(3, stop), stop=stop, **kwargs)
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["resumed_from_epoch"] == 1
    assert re.findall(r"chain r(\d) epoch (\d)/3", caplog.text) == [("2", "2"), ("2", "3")]
    assert not (tmp_path / "partial" / "chain").exists()


def test_retrain_with_an_empty_mask_resumes_too(tmp_path):
    """What a structured point does: a compacted model retrained with no mask to hold."""
    from lottery.points.recipe import retrain

    def checkpoint():
        return EpochCheckpoint.for_mask(tmp_path / "partial" / "s1", "s1", {}, seed=1)

    stop = StopToken()
    with pytest.raises(Preempted):
        retrain(_model(), {}, _recipe(3, stop, stop_on_call=2), label="s1", checkpoint=checkpoint(),
                stop=stop)
    stop = StopToken()
    result = retrain(_model(), {}, _recipe(3, stop), label="s1", checkpoint=checkpoint(), stop=stop)
    assert result["resumed_from_epoch"] == 1 and [r["epoch"] for r in result["history"]] == [1, 2, 3]
    assert result["sparsity"] == 0.0


# -- real launches on a real dense run -------------------------------------------------------
def digits_dense_run(spark, root: Path):
    """The ETL's digits (8x8, one shard per split) and lenet_300_100 trained one epoch."""
    from etl.job import prepare
    from etl.settings import EtlSettings
    from train.run import train_dense
    from train.settings import DenseSettings

    prepare(EtlSettings(source="digits", out=str(root / "digits8"), resize="fixed:8",
                        format="tfrecord", train_shards=1, validation_shards=1), spark=spark)
    return train_dense(DenseSettings(data=str(root / "digits8"), model="lenet_300_100",
                                     out=str(root / "runs"), epochs=1, batch_size=64, lr=0.05,
                                     augment="none"))


@pytest.fixture(scope="module")
def dense_run(spark, tmp_path_factory):
    return digits_dense_run(spark, tmp_path_factory.mktemp("preempt"))


def plan_points(run, sparsities: str) -> GridPaths:
    """A grid of one-shot points of EPOCHS epochs each on `run`."""
    from common.settings import make_settings
    from lottery.grid.plan import plan
    from lottery.grid.settings import GridSettings

    return plan(run.root, make_settings(GridSettings, {"sparsities": sparsities, "epochs": EPOCHS,
                                                       "exclude": ["logits*"]}))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "SLURM_", "PMIX_", "MPI_LOCAL"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["BIGTICKET_GPUS_PER_NODE"] = "0"
    return env


def _launch(cmd, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    # Its own session: the test signals exactly this launch's process group.
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc


def _epochs_saved(grid: GridPaths, task_id: str) -> int:
    try:
        return int(read_json(grid.partial_state(task_id) / "state.json")["epochs_done"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _stop_mid_points(proc, grid: GridPaths, task_ids, log_path: Path, timeout=240) -> dict[str, int]:
    """Wait until every point in `task_ids` has saved >= 2 epochs, SIGTERM the launch's process
    group, wait for it; returns the epochs each point had saved when the launch ended."""
    deadline = time.monotonic() + timeout
    while not all(_epochs_saved(grid, t) >= 2 for t in task_ids):
        assert proc.poll() is None, log_path.read_text()[-4000:]
        assert time.monotonic() < deadline, "points did not start in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, log_path.read_text()[-4000:]
    return {t: _epochs_saved(grid, t) for t in task_ids}


def trained_epochs(log_text: str, task_id: str) -> Counter:
    """How often each epoch of `task_id` was trained to completion, from the log lines."""
    return Counter(int(n) for n in re.findall(rf"\b{re.escape(task_id)} epoch (\d+)/{EPOCHS}\b", log_text))


def check_resumed(grid: GridPaths, saved: dict[str, int | None], log_text: str) -> None:
    """Every point done once, with all its epochs, each trained once; `saved` points resumed
    (at that epoch, or at >= 2 when the value is None)."""
    tasks = {t.task_id for t in load_tasks(grid.root)}
    assert done_ids(grid) == tasks
    assert not list(grid.claims.glob("*.claim"))
    assert not grid.partial.exists() or not any(grid.partial.iterdir())  # finished: no state left
    for task_id in tasks:
        result = read_json(grid.result(task_id))["result"]
        assert [row["epoch"] for row in result["history"]] == list(range(1, EPOCHS + 1))
        # Every epoch trained exactly once over both launches: none lost, none retrained.
        assert trained_epochs(log_text, task_id) == Counter(range(1, EPOCHS + 1)), task_id
        if task_id in saved:
            assert result["resumed_from_epoch"] == (saved[task_id] or result["resumed_from_epoch"]) >= 2


@pytest.mark.slow
@pytest.mark.cluster
def test_mpi_ranks_stop_on_sigterm_and_a_rerun_resumes_them(dense_run, tmp_path):
    from lottery.points.runners import train_point

    grid = plan_points(dense_run, "0.5,0.8")
    reference = GridPaths(grid.root.parent / "lottery-reference")   # the same plan, untouched
    shutil.copytree(grid.root, reference.root)
    ids = [t.task_id for t in load_tasks(grid.root)]
    log_path = tmp_path / "launches.log"
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "lottery", "run",
           "--grid", str(grid.root)]
    saved = _stop_mid_points(_launch(cmd, log_path), grid, ids, log_path)
    first = log_path.read_text()
    assert done_ids(grid) == set() and not list(grid.claims.glob("*.claim")), first[-3000:]
    assert "stop requested" in first and all(n < EPOCHS for n in saved.values())

    rerun = _launch(cmd, log_path)
    assert rerun.wait(timeout=240) == 0, log_path.read_text()[-4000:]
    check_resumed(grid, saved, log_path.read_text())
    # The resumed point equals the same point trained without interruption, epoch by epoch.
    task = next(t for t in load_tasks(grid.root) if t.task_id == ids[0])
    straight = train_point(dense_run.root, reference.root, task, load_plan(reference.root)["settings"],
                           StopToken())
    resumed = read_json(grid.result(ids[0]))["result"]
    assert [{k: v for k, v in row.items() if k != "time"} for row in resumed["history"]] == \
        [{k: v for k, v in row.items() if k != "time"} for row in straight["history"]]
    assert resumed["accuracy"] == straight["accuracy"] and straight["resumed_from_epoch"] == 0


@pytest.mark.slow
def test_a_single_process_stops_on_sigterm_and_resumes(dense_run, tmp_path):
    grid = plan_points(dense_run, "0.6")
    ids = [t.task_id for t in load_tasks(grid.root)]
    log_path = tmp_path / "launches.log"
    cmd = [sys.executable, "-m", "lottery", "run", "--grid", str(grid.root)]
    saved = _stop_mid_points(_launch(cmd, log_path), grid, ids, log_path)
    assert done_ids(grid) == set() and not list(grid.claims.glob("*.claim"))
    rerun = _launch(cmd, log_path)
    assert rerun.wait(timeout=240) == 0, log_path.read_text()[-4000:]
    check_resumed(grid, saved, log_path.read_text())
