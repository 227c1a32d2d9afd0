"""The one-shot point: one mask applied to the weights of one rewind point, retrained, evaluated.

A task of kind "oneshot" names its mask (masks/<mask_id>.npz, written by the plan), its rewind
point and its control. A random_mask task's mask file already is the random one, so only
random_reinit changes the weights here. The task's retrain_mode picks the starting weights and the
rate (lottery.points.recipe: weights = rewind checkpoint; lr, finetune = final weights), and its
replicate the data order. lr and finetune points also record `pruned_accuracy`, the masked final
model's validation accuracy before any retraining (where fine-tuning starts). The point saves
every complete epoch in its partial state (GridPaths.partial_state) and resumes from it when it
is run again after a stop.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from common.paths import GridPaths
from common.stop import StopToken
from lottery.points.epoch_checkpoint import EpochCheckpoint
from lottery.points.masked_training import apply_mask
from lottery.points.point_metrics import recalibration_options
from lottery.points.point_weights import save_point_weights
from lottery.points.recipe import (
    dense_recipe,
    finetune_rate,
    lr_schedule_from,
    mask_shapes,
    open_dense_run,
    retrain,
    retrain_start,
)
from lottery.points.task import Task
from lottery.prune import masks as masks_mod
from train.checkpoints import load_checkpoint
from train.local_engine import configure_tensorflow

log = logging.getLogger(__name__)


def run_oneshot_task(run_dir: str | os.PathLike, grid_dir: str | os.PathLike, task: Task,
                     settings: Mapping[str, Any] | None = None, stop: StopToken | None = None
                     ) -> dict[str, Any]:
    """Run one oneshot task of a grid; returns its result (the scheduler writes the file).

    `settings` are the grid settings (their lr_schedule_from picks the retraining schedule);
    `stop` ends the training after its current batch (common.stop.Preempted).
    """
    import keras

    task.require("mask_id")
    grid = GridPaths(Path(grid_dir))
    mask, meta = masks_mod.load_mask(grid.mask(task.mask_id))
    run = open_dense_run(run_dir)
    configure_tensorflow(run.settings)
    keras.utils.set_random_seed(task.seed)
    model = load_checkpoint(run.paths.root, retrain_start(task.retrain_mode, task.rewind))
    constant = finetune_rate(run.settings, settings) if task.retrain_mode == "finetune" else None
    recipe = dense_recipe(run, epochs=task.epochs, start_epoch=run.position(task.rewind),
                          schedule_from=lr_schedule_from(settings), replicate=task.replicate,
                          constant_lr=constant, **recalibration_options(settings))
    reinit = task.seed + 1 if task.control == "random_reinit" else None
    log.info("task %s: mask %s (sparsity %.4f), rewind %s, control %s, mode %s, replicate %d, "
             "%d epochs", task.task_id, task.mask_id,
             masks_mod.mask_sparsity(mask, mask_shapes(model, mask))["overall"], task.rewind,
             task.control, task.retrain_mode, task.replicate, recipe.epochs)
    checkpoint = EpochCheckpoint.for_mask(grid.partial_state(task.task_id), task.task_id, mask,
                                          seed=task.seed)
    extra: dict[str, Any] = {}
    if task.retrain_mode != "weights":
        extra["pruned_accuracy"] = pruned_accuracy(model, mask, recipe)
        if constant is not None:
            extra["finetune_lr"] = constant
    result = retrain(model, mask, recipe, reinit_seed=reinit, label=task.task_id,
                     checkpoint=checkpoint, stop=stop)
    save_point_weights(grid.root, task.task_id, model)  # before the result: robustness, quantisation
    return {**task.result_fields(), "mask_meta": meta, **extra, **result}


def pruned_accuracy(model, mask, recipe) -> float:
    """Validation accuracy of `model` with `mask` applied, before any retraining (the mask is
    applied in place: retraining applies it again, which changes nothing)."""
    import keras

    apply_mask(model, mask)
    probe = keras.models.clone_model(model)  # compiled apart: the point's optimizer stays fresh
    probe.set_weights(model.get_weights())
    probe.compile(loss=recipe.loss, metrics=["accuracy"])
    data = recipe.validation_data
    scores = (probe.evaluate(*data, verbose=0, return_dict=True) if isinstance(data, tuple)
              else probe.evaluate(data, verbose=0, return_dict=True))
    return float(scores["accuracy"])
