"""Per-epoch hooks: everything the dense epoch loop (`train.run`) does besides training.

The loop trains an epoch, evaluates it, appends its history row, calls the hooks and then saves
the resume state; nothing else. Hooks add the rest (the driver registers them from the settings:
`train.run.epoch_hooks`): rewind checkpoints, TensorBoard scalars and early stopping here, the
Early-Bird detector in `train.early_bird`. A new per-epoch feature is a new hook, not a new branch
in the loop.

The calls, in every process of the run (multiworker: on every worker, so all agree on when to
stop; hooks that write files do so on the chief only):

    on_train_begin(state) -> stop?     the resume state is loaded: state.history holds the
                                       completed epochs; True when the run already ended there
    on_step(step, state)               after each global step in `pause_steps`: the engine pauses
                                       exactly there (weights of that step, mid-epoch too)
    on_epoch_end(epoch, row, state) -> stop?
                                       epoch (1-based) is trained, evaluated and in
                                       state.history; the resume state does not name it yet, so
                                       what a hook writes here is rewritten if the run is killed
                                       before the epoch is complete
    on_train_end(state)                the loop has ended (not called when training fails)

Every hook is called, even after an earlier one asked to stop.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from common.paths import DenseRunPaths
from train.checkpoints import save_checkpoint
from train.run_files import HISTORY_COLUMNS
from train.settings import DenseSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoopState:
    """What the loop shares with its hooks."""

    settings: DenseSettings
    run: DenseRunPaths
    model: Any                 # the engine's compiled model (weights and optimizer state)
    chief: bool                # the process that writes the run directory
    steps_per_epoch: int
    epochs_done: int           # complete epochs (those the resume state names)
    history: list[dict]        # one row per complete epoch, as in history.csv


class EpochHook:
    """Base of the loop's hooks: every method is optional (see the module docstring)."""

    pause_steps: frozenset[int] = frozenset()

    def on_train_begin(self, state: LoopState) -> bool:
        return False

    def on_step(self, step: int, state: LoopState) -> None:
        pass

    def on_epoch_end(self, epoch: int, row: dict[str, float], state: LoopState) -> bool:
        return False

    def on_train_end(self, state: LoopState) -> None:
        pass


class RewindCheckpoints(EpochHook):
    """Checkpoint `<label>` at each rewind point's global step (label -> step); chief only.

    Points at step 0 are saved when training starts afresh (beside "init"), the others when the
    engine pauses at their step, which may fall inside an epoch.
    """

    def __init__(self, rewinds: dict[str, int]):
        self.rewinds = dict(rewinds)
        self.pause_steps = frozenset(self.rewinds.values())

    def on_train_begin(self, state: LoopState) -> bool:
        if state.epochs_done == 0:
            self._save_at(0, state)
        return False

    def on_step(self, step: int, state: LoopState) -> None:
        self._save_at(step, state)

    def _save_at(self, step: int, state: LoopState) -> None:
        for label, at in self.rewinds.items():
            if at == step:
                save_checkpoint(state.model, state.run, label)

    def on_train_end(self, state: LoopState) -> None:
        done_steps = len(state.history) * state.steps_per_epoch
        missing = [label for label, step in self.rewinds.items() if step > done_steps]
        if missing:
            log.warning("stopped early at step %d: no checkpoint for rewind point(s) %s",
                        done_steps, ", ".join(missing))


def should_stop_early(settings: DenseSettings, history: Sequence[dict]) -> bool:
    """True when the monitored validation metric has not improved for `patience` epochs."""
    patience = settings.early_stopping_patience
    metric = settings.early_stopping_metric
    if not patience or len(history) <= patience:
        return False
    values = [row[metric] for row in history]
    sign = -1.0 if metric == "val_loss" else 1.0
    best_index = max(range(len(values)), key=lambda i: (sign * values[i], -i))
    return len(values) - 1 - best_index >= patience


class EarlyStopping(EpochHook):
    """Stop when settings.early_stopping_metric has not improved for its patience in epochs."""

    def __init__(self, settings: DenseSettings):
        self.settings = settings

    def on_train_begin(self, state: LoopState) -> bool:
        return should_stop_early(self.settings, state.history)

    def on_epoch_end(self, epoch: int, row: dict[str, float], state: LoopState) -> bool:
        if not should_stop_early(self.settings, state.history):
            return False
        log.info("early stopping after epoch %d: %s has not improved for %d epochs", epoch,
                 self.settings.early_stopping_metric, self.settings.early_stopping_patience)
        return True


class TensorBoardScalars(EpochHook):
    """The history columns of every epoch as TensorBoard scalars under `tensorboard/`; chief only."""

    def __init__(self):
        self.writer = None

    def on_train_begin(self, state: LoopState) -> bool:
        import tensorflow as tf

        self.writer = tf.summary.create_file_writer(str(state.run.tensorboard))
        return False

    def on_epoch_end(self, epoch: int, row: dict[str, float], state: LoopState) -> bool:
        import tensorflow as tf

        with self.writer.as_default(step=epoch):
            for key in HISTORY_COLUMNS[1:]:
                if key in row:
                    tf.summary.scalar(key, row[key])
        self.writer.flush()
        return False

    def on_train_end(self, state: LoopState) -> None:
        self.writer.close()
