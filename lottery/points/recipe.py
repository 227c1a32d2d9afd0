"""The shared recipe of every grid point: how to retrain a pruned model, and the dense run's recipe.

`retrain` is the core (any model, any data, any mask, including none); `dense_recipe` reads the
dense run's recipe (optimizer, learning-rate schedule, epochs, data pipeline) from its
settings.json. The runners (lottery.points.oneshot, imp, structured) build on both.

Rewinding: the weights come from the rewind checkpoint; the optimizer state starts fresh (the
checkpoint's is not restored). The learning rate follows the grid's `lr_schedule_from`
(`retraining_lr`): `rewind` (the default) continues the dense schedule from the rewind point's
position in the dense run, clamped at its end, for the task's `epochs` epochs, so fewer epochs than
the dense run's stop before the schedule anneals; `fresh` runs the whole dense schedule compressed
into the task's epochs. With the default rewind `init` and the default epochs both are exactly the
dense run's recipe.

Replicates: replicate 0 reads the training data in the dense run's order (as points always did);
replicate r >= 1 in an order seeded by `replicate_data_seed`, the same for every task of that
replicate, so a ticket and its controls of one replicate see the same batches (a paired design).

Retraining modes (`retrain_start`): weights starts from the rewind checkpoint; lr and finetune
start from the dense run's final weights (masked). lr replays the schedule from the rewind point
as above; finetune trains at a constant rate, `finetune_lr` of the grid or by default the dense
schedule's rate in its last epoch (Renda, Frankle & Carbin 2020 fine-tune at the final rate).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from common.atomic import read_json
from common.paths import DenseRunPaths
from common.settings import make_settings
from common.stop import StopToken
from lottery.points.epoch_checkpoint import EpochCheckpoint
from lottery.points.masked_training import check_mask, reinitialize, train_masked
from lottery.points.point_metrics import finish_point
from lottery.prune import masks as masks_mod
from train import adversarial
from train.checkpoints import RewindPoint
from train.data import make_dataset, open_dataset
from train.local_engine import compile_kwargs, make_optimizer
from train.metrics import compile_metrics
from train.schedules import lr_at
from train.settings import DenseSettings


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
    num_classes: int | None = None       # > 5: top-5 accuracy is recorded too (train.metrics)
    bn_recalibration: str = "auto"       # after retraining (lottery.points.point_metrics)
    bn_recalibration_batches: int = 20


def history_rows(history: Mapping[str, list[float]]) -> list[dict[str, float]]:
    """{'loss': [..], ...} -> [{'epoch': 1, 'loss': .., ...}, ...]"""
    n = max((len(v) for v in history.values()), default=0)
    return [{"epoch": i + 1, **{k: v[i] for k, v in history.items() if i < len(v)}} for i in range(n)]


def retrain(model, mask: Mapping[str, np.ndarray], recipe: Recipe, *, reinit_seed: int | None = None,
            label: str = "point", checkpoint: EpochCheckpoint | None = None,
            stop: StopToken | None = None) -> dict[str, Any]:
    """Retrain `model` (holding the rewind weights) under `mask`; the result of the point.

    reinit_seed: the random_reinit control (fresh initial weights drawn with this seed, same mask).
    checkpoint: where every complete epoch is saved and resumed from (a grid point passes its own,
    EpochCheckpoint.for_mask in its partial state); None trains without one. stop: a StopToken
    that raises common.stop.Preempted after the current batch once requested.
    """
    t0 = time.perf_counter()
    if reinit_seed is not None:
        reinitialize(model, reinit_seed)
    adversarial.install(model, adversarial.retraining_config())  # grid's adversarial retraining
    history = train_masked(model, mask, recipe.train_data, recipe.validation_data,
                           optimizer=recipe.optimizer, loss=recipe.loss, epochs=recipe.epochs,
                           learning_rate=recipe.learning_rate, batch_size=recipe.batch_size, label=label,
                           checkpoint=checkpoint, stop=stop,
                           metrics=compile_metrics(recipe.num_classes))
    if "val_accuracy" not in history:
        raise ValueError("the recipe has no validation data: a grid point is judged on it")
    val_acc = history["val_accuracy"]
    best = int(np.argmax(val_acc))
    real = masks_mod.mask_sparsity(mask, mask_shapes(model, mask))
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
        # top-5, BatchNorm recalibration, chance check (may override accuracy and loss)
        **finish_point(model, history, recipe, label),
    }


def mask_shapes(model, mask: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of the weights of `model` that `mask` covers (checked against the mask)."""
    return {n: tuple(v.shape) for n, v in check_mask(model, mask).items()}


# --------------------------------------------------------------------------- the dense run's recipe
@dataclasses.dataclass(frozen=True)
class DenseRun:
    paths: DenseRunPaths
    record: dict            # settings.json as written by train.run
    settings: DenseSettings  # resolved

    def position(self, rewind: str) -> float:
        """Where `rewind` sits in the dense run, in epochs (for the learning-rate schedule)."""
        if rewind == "init":
            return 0.0
        if rewind == "final":
            return float(self.settings.epochs)
        point = RewindPoint.parse(rewind)
        if point.unit == "ep":
            return float(point.count)
        return point.count / int(self.record["steps_per_epoch"])


def open_dense_run(run_dir: str | os.PathLike) -> DenseRun:
    run = DenseRunPaths(Path(run_dir))
    if not run.settings.is_file():
        raise FileNotFoundError(f"--run {run.root}: not a dense run directory (no settings.json)")
    record = read_json(run.settings)
    try:
        settings = make_settings(DenseSettings, record["settings"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{run.settings}: field settings is missing or malformed ({err})") from None
    return DenseRun(run, record, settings)


LR_SCHEDULES_FROM = ("rewind", "fresh")


def lr_schedule_from(grid_settings: Mapping[str, Any] | None) -> str:
    """The grid's `lr_schedule_from` (absent from grids planned with the default)."""
    return (grid_settings or {}).get("lr_schedule_from") or "rewind"


def retraining_lr(settings: DenseSettings, epochs: int, start_epoch: float,
                  schedule_from: str = "rewind") -> Callable[[int], float]:
    """Retraining epoch (0-based) -> learning rate, from the dense run's schedule.

    rewind: the dense rate at start_epoch + epoch, clamped at the end of the dense run.
    fresh:  the dense schedule from its start squeezed into `epochs`: retraining epoch e runs at
            the dense rate of epoch e * (D - 1) / (epochs - 1) of D, so the first epoch has the
            dense run's first rate and the last its last (one epoch: the first rate).
    """
    dense = settings.epochs
    if schedule_from == "rewind":
        return lambda epoch: lr_at(settings, min(start_epoch + epoch, float(dense)))
    if schedule_from == "fresh":
        stride = (dense - 1) / (epochs - 1) if epochs > 1 else 0.0
        return lambda epoch: lr_at(settings, min(epoch * stride, float(dense - 1)))
    raise ValueError(f"lr_schedule_from: {schedule_from!r} is not one of {', '.join(LR_SCHEDULES_FROM)}")


def replicate_data_seed(dense_seed: int, replicate: int) -> int:
    """The data-order seed of replicate `replicate`: the dense run's own seed for replicate 0."""
    if not replicate:
        return dense_seed
    return (dense_seed * 1_000_003 + zlib.crc32(f"replicate-{replicate}".encode())) % (2**31 - 1)


def retrain_start(retrain_mode: str, rewind: str) -> str:
    """The checkpoint a point's weights start from: the rewind point, or final for lr/finetune."""
    return rewind if retrain_mode == "weights" else "final"


def finetune_rate(settings: DenseSettings, grid_settings: Mapping[str, Any] | None) -> float:
    """Retrain mode finetune's constant rate: the grid's finetune_lr, else the dense rate of the
    last epoch (not lr_at(epochs): a cosine schedule is 0 there)."""
    given = (grid_settings or {}).get("finetune_lr")
    return float(given) if given else lr_at(settings, float(settings.epochs - 1))


def dense_recipe(run: DenseRun, *, epochs: int | None = None, start_epoch: float = 0.0,
                 schedule_from: str = "rewind", replicate: int = 0,
                 constant_lr: float | None = None, bn_recalibration: str = "auto",
                 bn_recalibration_batches: int = 20) -> Recipe:
    """The dense run's optimizer, loss, schedule and data, for `epochs` epochs from `start_epoch`
    (the learning rate as `retraining_lr` gives it for `schedule_from`, or `constant_lr`); the
    data in the order of replicate `replicate` (replicate_data_seed). bn_recalibration*: the
    grid's (lottery.points.point_metrics.recalibration_options)."""
    s = run.settings
    info = open_dataset(s.data)
    if info.manifest_sha256 != run.record.get("manifest_sha256"):
        raise ValueError(f"{run.paths.settings}: the dataset at {s.data} is not the one this run "
                         f"was trained on (manifest sha256 differs)")
    epochs = epochs or s.epochs
    kwargs = dict(batch_size=s.batch_size, input_size=s.input_size, fmt=s.format, cache=s.cache)
    data_seed = replicate_data_seed(s.seed, replicate)

    def train_data(epoch: int):
        # The dense run's data order for the same epoch of the schedule (seeded by its seed).
        return make_dataset(info, "train", training=True, seed=data_seed,
                            epoch=int(math.floor(start_epoch)) + epoch, augment=s.augment,
                            shuffle_buffer=s.shuffle_buffer, **kwargs)

    return Recipe(
        optimizer=make_optimizer(s),
        loss=compile_kwargs()["loss"],
        epochs=epochs,
        train_data=train_data,
        validation_data=make_dataset(info, "validation", training=False, **kwargs),
        learning_rate=(retraining_lr(s, epochs, start_epoch, schedule_from) if constant_lr is None
                       else (lambda _epoch: constant_lr)),
        num_classes=info.num_classes,
        bn_recalibration=bn_recalibration,
        bn_recalibration_batches=bn_recalibration_batches,
    )
