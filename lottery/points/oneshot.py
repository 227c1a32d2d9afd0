"""One grid point: a mask applied to the weights of one rewind point, retrained, evaluated.

`retrain` is the core (any model, any data); `dense_recipe` reads the dense run's recipe (optimizer,
learning-rate schedule, epochs, data pipeline) from its settings.json; `train_point` is what the
scheduler calls for a task of kind "oneshot" (IMP chains go to lottery.points.imp.run_imp_task, channel
pruning to lottery.points.structured.run_structured_task).

Rewinding: the weights come from the rewind checkpoint; the optimizer state starts fresh (the
checkpoint's is not restored) and the learning-rate schedule continues from the rewind point's
position in the dense run, clamped at its end, for the task's `epochs` epochs. With the default
rewind `init` and the default epochs this is exactly the dense run's recipe.

Preemption: `train_point` makes the task's partial-state directory (GridPaths.partial_state) the
place where every `retrain` inside it (oneshot, each IMP round, structured points) saves its last
complete epoch, and resumes from it when the point is run again after a stop (see
lottery.points.masked_training). `retrain` callers outside a grid point may pass `checkpoint=` themselves.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from common.atomic import read_json
from common.paths import DenseRunPaths, GridPaths
from lottery.prune import masks as masks_mod

log = logging.getLogger(__name__)

CONTROLS = ("none", "random_reinit", "random_mask")


@dataclasses.dataclass
class Recipe:
    """How to (re)train: everything but the model and the mask."""

    optimizer: Any                       # keras optimizer (its class and config are reused)
    loss: Any
    epochs: int
    train_data: Any                      # (x, y) | dataset | callable epoch -> either
    validation_data: Any                 # (x, y) | dataset
    learning_rate: Callable[[int], float | None] | None = None   # retraining epoch -> rate
    batch_size: int | None = None        # for array data only


def history_rows(history: Mapping[str, list[float]]) -> list[dict[str, float]]:
    """{'loss': [..], ...} -> [{'epoch': 1, 'loss': .., ...}, ...]"""
    n = max((len(v) for v in history.values()), default=0)
    return [{"epoch": i + 1, **{k: v[i] for k, v in history.items() if i < len(v)}} for i in range(n)]


# The partial-state directory and seed of the grid point running in this thread (train_point).
_POINT_STATE: contextvars.ContextVar[tuple[Path, int] | None] = contextvars.ContextVar(
    "bigticket_point_state", default=None)


@contextlib.contextmanager
def point_state(directory: str | os.PathLike, seed: int = 0):
    """Within this block, `retrain` checkpoints every epoch under `directory` and resumes from it."""
    token = _POINT_STATE.set((Path(directory), int(seed)))
    try:
        yield
    finally:
        _POINT_STATE.reset(token)


def _checkpoint_for(label: str, mask: Mapping[str, np.ndarray]):
    active = _POINT_STATE.get()
    if active is None:
        return None
    from lottery.points.masked_training import EpochCheckpoint, mask_digest

    directory, seed = active
    # One directory per point; the key tells its runs (IMP rounds) and masks apart.
    return EpochCheckpoint(directory, key=f"{label}|{mask_digest(mask)}", seed=seed)


def retrain(model, mask: Mapping[str, np.ndarray], recipe: Recipe, *, reinit_seed: int | None = None,
            label: str = "point", checkpoint=None) -> dict[str, Any]:
    """Retrain `model` (holding the rewind weights) under `mask`; the result of the point.

    reinit_seed: the random_reinit control (fresh initial weights drawn with this seed, same mask).
    checkpoint: a lottery.points.masked_training.EpochCheckpoint; by default the running grid point's
    (see `point_state`), or none outside a grid point. `label` must be the same when the point is
    run again, or its saved epochs are not resumed.
    """
    from lottery.points.masked_training import reinitialize, train_masked

    t0 = time.perf_counter()
    if checkpoint is None:
        checkpoint = _checkpoint_for(label, mask)
    if reinit_seed is not None:
        reinitialize(model, reinit_seed)
    history = train_masked(model, mask, recipe.train_data, recipe.validation_data,
                           optimizer=recipe.optimizer, loss=recipe.loss, epochs=recipe.epochs,
                           learning_rate=recipe.learning_rate, batch_size=recipe.batch_size, label=label,
                           checkpoint=checkpoint)
    if "val_accuracy" not in history:
        raise ValueError("the recipe has no validation data: a grid point is judged on it")
    val_acc = history["val_accuracy"]
    best = int(np.argmax(val_acc))
    from lottery.points.masked_training import check_mask

    shapes = {n: tuple(v.shape) for n, v in check_mask(model, mask).items()}
    real = masks_mod.mask_sparsity(mask, shapes)
    return {
        "accuracy": float(val_acc[-1]),
        "loss": float(history["val_loss"][-1]),
        "best_accuracy": float(val_acc[best]),
        "epochs_to_best": best + 1,
        "sparsity": real["overall"],
        "remaining_weights": real["remaining"],
        "total_weights": real["total"],
        "layer_sparsity": {n: row["sparsity"] for n, row in real["layers"].items()},
        "epochs": recipe.epochs,
        # Epochs restored from a preempted run (not trained again); wall_time_s is this run's only.
        "resumed_from_epoch": checkpoint.resumed_from if checkpoint is not None else 0,
        "wall_time_s": time.perf_counter() - t0,
        "history": history_rows(history),
    }


# --------------------------------------------------------------------------- the dense run's recipe
@dataclasses.dataclass(frozen=True)
class DenseRun:
    paths: DenseRunPaths
    record: dict            # settings.json as written by train.run
    settings: Any           # train.settings.DenseSettings (resolved)

    def position(self, rewind: str) -> float:
        """Where `rewind` sits in the dense run, in epochs (for the learning-rate schedule)."""
        from train.checkpoints import RewindPoint

        if rewind == "init":
            return 0.0
        if rewind == "final":
            return float(self.settings.epochs)
        point = RewindPoint.parse(rewind)
        if point.unit == "ep":
            return float(point.count)
        return point.count / int(self.record["steps_per_epoch"])


def open_dense_run(run_dir: str | os.PathLike) -> DenseRun:
    from common.settings import make_settings
    from train.settings import DenseSettings

    run = DenseRunPaths(Path(run_dir))
    if not run.settings.is_file():
        raise FileNotFoundError(f"--run {run.root}: not a dense run directory (no settings.json)")
    record = read_json(run.settings)
    try:
        settings = make_settings(DenseSettings, record["settings"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{run.settings}: field settings is missing or malformed ({err})") from None
    return DenseRun(run, record, settings)


def dense_recipe(run: DenseRun, *, epochs: int | None = None, start_epoch: float = 0.0) -> Recipe:
    """The dense run's optimizer, loss, schedule and data, for `epochs` epochs from `start_epoch`."""
    from train.data import make_dataset, open_dataset
    from train.local_engine import compile_kwargs, make_optimizer
    from train.schedules import lr_at

    s = run.settings
    info = open_dataset(s.data)
    if info.manifest_sha256 != run.record.get("manifest_sha256"):
        raise ValueError(f"{run.paths.settings}: the dataset at {s.data} is not the one this run "
                         f"was trained on (manifest sha256 differs)")
    epochs = epochs or s.epochs
    kwargs = dict(batch_size=s.batch_size, input_size=s.input_size, fmt=s.format, cache=s.cache)

    def train_data(epoch: int):
        # The dense run's data order for the same epoch of the schedule (seeded by its seed).
        return make_dataset(info, "train", training=True, seed=s.seed,
                            epoch=int(math.floor(start_epoch)) + epoch, augment=s.augment,
                            shuffle_buffer=s.shuffle_buffer, **kwargs)

    return Recipe(
        optimizer=make_optimizer(s),
        loss=compile_kwargs()["loss"],
        epochs=epochs,
        train_data=train_data,
        validation_data=make_dataset(info, "validation", training=False, **kwargs),
        learning_rate=lambda epoch: lr_at(s, min(start_epoch + epoch, float(s.epochs))),
    )


def _safe_name(text: str) -> bool:
    """Usable as a file name under the grid: no separators, no hidden names (no path traversal)."""
    return bool(text) and not text.startswith(".") and len(text) <= 200 \
        and all(c.isalnum() or c in "-_." for c in text)


def _check_task(task: Mapping[str, Any]) -> None:
    for field in ("task_id", "rewind", "control"):
        if field not in task:
            raise ValueError(f"task {task.get('task_id', '?')}: field {field!r} is missing")
    if not _safe_name(str(task["task_id"])):
        raise ValueError(f"task {task['task_id']!r}: field task_id is not a safe file name")
    if task["control"] not in CONTROLS:
        raise ValueError(f"task {task['task_id']}: field control is {task['control']!r}, "
                         f"expected one of {CONTROLS}")


def train_point(run_dir: str | os.PathLike, grid_dir: str | os.PathLike, task: Mapping[str, Any],
                settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one oneshot task of a grid (see lottery.grid.plan for the task fields); returns its result.

    The caller (the scheduler) writes the result file. `settings` are the grid settings (unused
    beyond the task's own fields, accepted for a uniform call). A random_mask task's mask file is
    already the random one (the plan writes it), so only random_reinit changes the weights here.
    """
    _check_task(task)
    grid = GridPaths(Path(grid_dir))
    # Every retrain below checkpoints its epochs under the point's partial state (resumable).
    with point_state(grid.partial_state(str(task["task_id"])), int(task.get("seed", 0))):
        return _dispatch(run_dir, grid, task, settings)


def _dispatch(run_dir, grid: GridPaths, task: Mapping[str, Any], settings) -> dict[str, Any]:
    import keras

    from train.checkpoints import load_checkpoint
    from train.local_engine import configure_tensorflow

    if task.get("kind", "oneshot") == "imp":
        from lottery.points.imp import run_imp_task

        return run_imp_task(run_dir, grid.root, task, settings)
    if task.get("kind") == "structured":
        from lottery.points.structured import run_structured_task

        return run_structured_task(run_dir, grid.root, task, settings)
    mask_id = str(task.get("mask_id") or "")
    if not _safe_name(mask_id):  # becomes a file name under masks/
        raise ValueError(f"task {task['task_id']}: field mask_id {task.get('mask_id')!r} is missing or "
                         f"not a safe file name")
    mask, meta = masks_mod.load_mask(grid.mask(mask_id))
    run = open_dense_run(run_dir)
    configure_tensorflow(run.settings)
    keras.utils.set_random_seed(int(task.get("seed", 0)))
    model = load_checkpoint(run.paths.root, task["rewind"])
    recipe = dense_recipe(run, epochs=task.get("epochs"), start_epoch=run.position(task["rewind"]))
    reinit = int(task.get("seed", 0)) + 1 if task["control"] == "random_reinit" else None
    log.info("task %s: mask %s (sparsity %.4f), rewind %s, control %s, %d epochs", task["task_id"],
             task["mask_id"], masks_mod.mask_sparsity(mask, _shapes(model, mask))["overall"],
             task["rewind"], task["control"], recipe.epochs)
    result = retrain(model, mask, recipe, reinit_seed=reinit, label=str(task["task_id"]))
    return {**task_fields(task), "mask_meta": meta, **result}


def _shapes(model, mask) -> dict[str, tuple[int, ...]]:
    from lottery.points.masked_training import check_mask

    return {n: tuple(v.shape) for n, v in check_mask(model, mask).items()}


def task_fields(task: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("task_id", "kind", "mask_id", "base_mask_id", "rewind", "control", "scope", "threshold",
            "imp_rounds", "imp_rate", "seed")
    return {k: task[k] for k in keep if k in task} | {"target_sparsity": task.get("sparsity")}
