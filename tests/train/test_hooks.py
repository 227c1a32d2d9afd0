"""The dense loop's hooks: when each is called and what it sees, with real training on digits."""
from __future__ import annotations

import json

import pytest

from common.paths import DenseRunPaths
from train.hooks import EarlyStopping, EpochHook, LoopState, RewindCheckpoints, TensorBoardScalars
from train.run import epoch_hooks, prepare_run, train_dense
from train.run_files import read_history
from train.settings import DenseSettings

STEPS_PER_EPOCH = 23  # ceil(1438 training digits / 64)


def _settings(digits_dir, out, **kw) -> DenseSettings:
    values = dict(data=str(digits_dir), out=str(out), model="lenet_300_100", epochs=3,
                  batch_size=64, lr=0.05, augment="none", seed=2)
    return DenseSettings(**{**values, **kw})


def _resume_epochs(run: DenseRunPaths) -> int | None:
    state = run.resume / "state.json"
    return json.loads(state.read_text())["epochs_done"] if state.is_file() else None


class Recorder(EpochHook):
    """Records every call with what the hook sees; stops or fails at the epochs it is told."""

    def __init__(self, pause=(), stop_after=None, fail_at=None):
        self.pause_steps = frozenset(pause)
        self.stop_after, self.fail_at = stop_after, fail_at
        self.calls = []

    def on_train_begin(self, state: LoopState) -> bool:
        self.calls.append(("begin", state.epochs_done, [r["epoch"] for r in state.history]))
        return False

    def on_step(self, step: int, state: LoopState) -> None:
        self.calls.append(("step", step, int(state.model.optimizer.iterations.numpy())))

    def on_epoch_end(self, epoch: int, row: dict, state: LoopState) -> bool:
        self.calls.append(("epoch", epoch, row["epoch"], state.history[-1] is row,
                           _resume_epochs(state.run)))
        if epoch == self.fail_at:
            raise RuntimeError(f"hook failed at epoch {epoch}")
        return epoch == self.stop_after

    def on_train_end(self, state: LoopState) -> None:
        self.calls.append(("end", len(state.history), state.run.success.exists()))


def test_a_hook_sees_each_step_and_epoch_in_order_and_can_stop_the_run(digits_dir, tmp_path):
    recorder = Recorder(pause=(5, STEPS_PER_EPOCH + 7), stop_after=2)
    run = train_dense(_settings(digits_dir, tmp_path), hooks=[recorder])
    assert recorder.calls == [
        ("begin", 0, []),
        ("step", 5, 5),                       # the engine paused exactly at the step
        ("epoch", 1, 1, True, None),          # the row is in the history, not yet in resume/
        ("step", STEPS_PER_EPOCH + 7, STEPS_PER_EPOCH + 7),
        ("epoch", 2, 2, True, 1),
        ("end", 2, False),                    # before the run is marked complete
    ]
    assert run.success.is_file() and not run.resume.exists()
    assert [r["epoch"] for r in read_history(run)] == [1, 2]

    again = Recorder()
    assert train_dense(_settings(digits_dir, tmp_path), hooks=[again]) == run
    assert again.calls == []  # a complete run is not touched


def test_a_run_that_failed_in_an_epoch_resumes_after_its_last_complete_epoch(digits_dir, tmp_path):
    settings = _settings(digits_dir, tmp_path)
    with pytest.raises(RuntimeError, match="hook failed at epoch 2"):
        train_dense(settings, hooks=[Recorder(fail_at=2)])
    run = prepare_run(settings).run
    assert not run.success.exists() and _resume_epochs(run) == 1

    recorder = Recorder()
    assert train_dense(settings, hooks=[recorder]) == run
    assert recorder.calls[0] == ("begin", 1, [1])
    assert [c[1] for c in recorder.calls if c[0] == "epoch"] == [2, 3]
    assert recorder.calls[-1] == ("end", 3, False)
    assert [r["epoch"] for r in read_history(run)] == [1, 2, 3] and run.success.is_file()


def test_the_settings_choose_the_hooks_and_only_the_chief_gets_those_that_write(tmp_path):
    run = DenseRunPaths(tmp_path)
    plain = DenseSettings(data="/d", model="lenet_300_100")
    assert [type(h) for h in epoch_hooks(plain, run, None, True, {"1ep": 5})] == [
        RewindCheckpoints, TensorBoardScalars]
    assert epoch_hooks(plain, run, None, False, {"1ep": 5}) == []
    patient = DenseSettings(data="/d", model="lenet_300_100", early_stopping_patience=2)
    assert [type(h) for h in epoch_hooks(patient, run, None, False, {})] == [EarlyStopping]


def test_early_stopping_also_ends_a_resumed_run_that_had_already_stopped(tmp_path):
    settings = DenseSettings(data="/d", model="lenet_300_100", early_stopping_patience=1,
                             epochs=10)
    history = [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": 0.6}]
    state = LoopState(settings, DenseRunPaths(tmp_path), None, True, 3, 2, history)
    assert EarlyStopping(settings).on_train_begin(state)
    assert not EarlyStopping(settings).on_train_begin(
        LoopState(settings, DenseRunPaths(tmp_path), None, True, 3, 1, history[:1]))
