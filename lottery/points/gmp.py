"""The GMP point: gradual magnitude pruning while retraining, to the task's sparsity.

A task of kind "gmp" (planned by lottery.grid.plan_gmp) starts from the dense run's `rewind`
checkpoint (init: the same start as the tickets), trains for the task's epochs with the dense
run's recipe (optimizer, learning-rate schedule, data order of the task's replicate), and grows
its masks by magnitude on the polynomial schedule of `train.gmp_schedule`: from 0 to the task's
sparsity, power 3, ending at GMP_END_FRACTION of the training steps, with GMP_UPDATES mask
updates (a last one forced at the end), then fine-tunes with the masks frozen for the remaining
epochs. The masks are those of dense GMP (`train.gmp.prune_to`, the growing-mask optimizer of
`train.masked_optimizer`), with the grid's scope and exclusions and over the same prunable
weights as the tickets (depthwise kernels included), so the realised sparsity is comparable.

The result has the fields of a one-shot point (accuracy, best_accuracy, sparsity, ...) plus the
schedule. Every complete epoch is saved in the point's partial state, masks included (they are
optimizer variables), and a stopped point resumes from it.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from common.paths import GridPaths
from common.stop import StopToken
from lottery.points.epoch_checkpoint import EpochCheckpoint
from lottery.points.point_metrics import finish_point, recalibration_options
from lottery.points.point_weights import save_point_weights
from lottery.points.recipe import dense_recipe, history_rows, lr_schedule_from, open_dense_run
from lottery.points.task import Task
from lottery.prune import masks as masks_mod
from lottery.prune.stats import prunable_variables
from train.checkpoints import load_checkpoint
from train.data import open_dataset
from train.gmp import current_masks, prune_to
from train.gmp_schedule import SparsitySchedule
from train.local_engine import configure_tensorflow
from train.masked_optimizer import as_plain_optimizer, gmp_optimizer
from train.metrics import compile_metrics

log = logging.getLogger(__name__)

GMP_END_FRACTION = 0.75   # masks reach the final sparsity here; the rest fine-tunes them
GMP_UPDATES = 20          # mask updates from 0 to the end (frequency = end // GMP_UPDATES)


def point_schedule(sparsity: float, total_steps: int) -> SparsitySchedule:
    end = max(1, int(round(GMP_END_FRACTION * total_steps)))
    return SparsitySchedule("polynomial", 0.0, float(sparsity), 0, end, 3.0, max(1, end // GMP_UPDATES))


def _callback(model, schedule: SparsitySchedule, scope: str, first_step: int, stop: StopToken | None):
    import keras

    class GrowMasks(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = first_step + batch + 1
            if schedule.is_update_step(step):
                prune_to(model, schedule.sparsity(step), scope)
            if stop is not None:
                stop.raise_if_requested("during an epoch")

    return GrowMasks()


def full_mask(model) -> dict[str, np.ndarray]:
    """The GMP masks over every prunable weight of the lottery stage (excluded ones kept whole)."""
    grown = current_masks(model)
    return {name: grown.get(name, np.ones(tuple(var.shape), dtype=bool))
            for name, var in prunable_variables(model).items()}


def run_gmp_task(run_dir: str | os.PathLike, grid_dir: str | os.PathLike, task: Task,
                 settings: Mapping[str, Any] | None = None, stop: StopToken | None = None
                 ) -> dict[str, Any]:
    """Run one gmp task of a grid; returns its result (the scheduler writes the file)."""
    import keras

    task.require("sparsity")
    grid = GridPaths(Path(grid_dir))
    run = open_dense_run(run_dir)
    configure_tensorflow(run.settings)
    keras.utils.set_random_seed(task.seed)
    model = load_checkpoint(run.paths.root, task.rewind)
    recipe = dense_recipe(run, epochs=task.epochs, start_epoch=run.position(task.rewind),
                          schedule_from=lr_schedule_from(settings), replicate=task.replicate,
                          **recalibration_options(settings))
    s = run.settings
    spe = open_dataset(s.data).steps("train", s.batch_size, fmt=s.format)
    schedule = point_schedule(task.sparsity, spe * recipe.epochs)
    optimizer = gmp_optimizer(recipe.optimizer, task.exclude, prune_depthwise=True)
    model.compile(optimizer=optimizer, loss=recipe.loss, metrics=compile_metrics(recipe.num_classes))
    optimizer.build(model.trainable_variables)
    checkpoint = EpochCheckpoint(grid.partial_state(task.task_id), key=f"{task.task_id}|gmp",
                                 seed=task.seed)
    log.info("task %s: GMP to sparsity %.4f (%s), updates at steps %s, %d epochs of %d steps",
             task.task_id, task.sparsity, task.scope, schedule.update_steps()[:4] + ["..."],
             recipe.epochs, spe)
    t0 = time.perf_counter()
    history: dict[str, list[float]] = {}
    start = 0
    resumed = checkpoint.load(model, optimizer)
    if resumed is not None:
        start, history = resumed
    for epoch in tqdm(range(start, recipe.epochs), desc=task.task_id, unit="epoch", initial=start,
                      total=recipe.epochs, leave=False, disable=None):
        if stop is not None:
            stop.raise_if_requested(f"before epoch {epoch + 1} of {task.task_id}")
        keras.utils.set_random_seed((int(task.seed) * 100_003 + epoch) % 2**32)
        if epoch == 0 and schedule.is_update_step(0):
            prune_to(model, schedule.sparsity(0), task.scope)
        optimizer.learning_rate.assign(recipe.learning_rate(epoch))
        t_epoch = time.perf_counter()
        logs = model.fit(recipe.train_data(epoch), epochs=1, validation_data=recipe.validation_data,
                         verbose=0, callbacks=[_callback(model, schedule, task.scope, epoch * spe, stop)]
                         ).history
        row = {k: float(v[-1]) for k, v in logs.items()}
        row["lr"] = float(np.asarray(optimizer.learning_rate))
        row["time"] = time.perf_counter() - t_epoch
        pruned = sum(int((~m).sum()) for m in current_masks(model).values())
        row["gmp_pruned"] = float(pruned)
        for key, value in row.items():
            history.setdefault(key, []).append(value)
        checkpoint.save(model, optimizer, epoch + 1, history)
    mask = full_mask(model)
    weights = {v.path: v.numpy() for v in model.trainable_variables}
    revived = [n for n, m in mask.items() if np.count_nonzero(weights[n][~m])]
    if revived:
        raise RuntimeError(f"task {task.task_id}: pruned weights are non-zero in {revived}")
    val_acc = history["val_accuracy"]
    best = int(np.argmax(val_acc))
    real = masks_mod.mask_sparsity(mask)
    result = {
        "accuracy": float(val_acc[-1]), "loss": float(history["val_loss"][-1]),
        "best_accuracy": float(val_acc[best]), "epochs_to_best": best + 1,
        "sparsity": real["overall"], "remaining_weights": real["remaining"],
        "total_weights": real["total"],
        "layer_sparsity": {n: row["sparsity"] for n, row in real["layers"].items()},
        "epochs": recipe.epochs, "resumed_from_epoch": checkpoint.resumed_from,
        "wall_time_s": time.perf_counter() - t0, "history": history_rows(history),
        "gmp_schedule": schedule.to_dict(),
        **finish_point(model, history, recipe, task.task_id),
    }
    with as_plain_optimizer(optimizer):  # models/<task>.keras names Keras classes only
        save_point_weights(grid.root, task.task_id, model)
    return {**task.result_fields(), **result}
