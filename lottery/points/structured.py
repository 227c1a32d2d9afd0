"""One structured grid point: channels drawn at a checkpoint, the network compacted, retrained.

The runner of tasks of kind "structured" (lottery.points.runners; planned by lottery.grid.plan).
The point loads the draw checkpoint and the channel mask planned for it, builds the physically
smaller network (lottery.prune.compaction.compact), measures both networks (parameters,
multiply-adds, file size), evaluates the compacted one, retrains it with the dense run's recipe
from epoch 0 (as the Early-Bird paper retrains its tickets) and evaluates it again. The retrained
compact model is saved to models/<task_id>.keras beside the result, and exported for CPU
deployment to models/<task_id>.tflite (LiteRT); both networks' CPU images/s are measured in that
export (lottery.points.inference). The retraining saves every complete epoch in the point's
partial state, kept until the scheduler has written the result: a point stopped during its export
or timing resumes there without retraining.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common.atomic import atomic_path
from common.paths import GridPaths
from common.stop import StopToken
from lottery.points.epoch_checkpoint import EpochCheckpoint
from lottery.points.inference import LiteRTModel, inference_rate
from lottery.points.point_metrics import recalibration_options
from lottery.points.recipe import Recipe, dense_recipe, lr_schedule_from, open_dense_run, retrain
from lottery.points.task import Task, TaskError
from lottery.prune import masks as masks_mod
from lottery.prune.compaction import compact, model_cost
from train.checkpoints import load_checkpoint
from train.local_engine import configure_tensorflow

log = logging.getLogger(__name__)

# CPU inference is measured briefly on each of the two networks: a grid point's cost is its
# retraining; the bench (bench/compaction_speedup.py) measures speed-ups carefully. Both networks
# are timed as deployed on CPUs, exported to LiteRT (lottery.points.inference), in interleaved
# rounds so machine load hits both alike.
INFERENCE_SECONDS = 1.0
INFERENCE_ROUNDS = 3
INFERENCE_BATCH = 32
INFERENCE_RUNTIME = "litert"
# One interpreter thread: grid ranks share a node's cores, and XNNPACK's spinning thread pool
# oversubscribed by a neighbouring rank ran 30x slower in the demo (2 ranks on 2 cores).
INFERENCE_THREADS = 1


def check_structured_task(task: Task) -> None:
    """What a task of kind "structured" needs beyond a valid Task (TaskError naming the field)."""
    task.require("mask_id", "ratio", "criterion")
    if task.control != "none":
        raise TaskError(f"task {task.task_id!r}: field control is {task.control!r}; structured "
                        f"points have no controls ('none')")


def _evaluate(model, recipe: Recipe) -> dict[str, float]:
    """Validation loss and accuracy of `model` as it is (compiled here for evaluation only)."""
    model.compile(loss=recipe.loss, metrics=["accuracy"])
    x = recipe.validation_data
    y = None
    if isinstance(x, tuple):
        x, y = x
    values = model.evaluate(x, y, batch_size=recipe.batch_size, verbose=0, return_dict=True)
    return {"accuracy": float(values["accuracy"]), "loss": float(values["loss"])}


def save_model(model, path: Path) -> Path:
    """Save `model` without its optimizer (the masked training's optimizer class is not a
    registered Keras class; the file must load anywhere with safe_mode)."""
    import keras

    plain = keras.Model.from_config(model.get_config())
    plain.set_weights(model.get_weights())
    with atomic_path(path, ".keras") as tmp:  # Keras insists on the suffix
        plain.save(str(tmp))
    return path


def _inference_rates(dense: LiteRTModel, small: LiteRTModel) -> tuple[float, float]:
    """Median CPU images/s of the exported dense and compact networks, interleaved."""
    arms = (dense, small)
    rates: tuple[list[float], list[float]] = ([], [])
    for _ in range(INFERENCE_ROUNDS):
        for model, measured in zip(arms, rates):
            measured.append(inference_rate(model, batch_size=INFERENCE_BATCH, stat="median",
                                           threads=INFERENCE_THREADS,
                                           seconds=INFERENCE_SECONDS / INFERENCE_ROUNDS))
    return float(np.median(rates[0])), float(np.median(rates[1]))


def run_structured_task(run_dir: str | os.PathLike, grid_dir: str | os.PathLike, task: Task,
                        settings: Mapping[str, Any] | None = None, stop: StopToken | None = None
                        ) -> dict[str, Any]:
    """Run one structured point of a grid; returns its result (the scheduler writes the file)."""
    import keras

    t0 = time.perf_counter()
    check_structured_task(task)
    grid = GridPaths(Path(grid_dir))
    mask, meta = masks_mod.load_mask(grid.mask(task.mask_id))
    run = open_dense_run(run_dir)
    configure_tensorflow(run.settings)
    keras.utils.set_random_seed(task.seed)
    dense = load_checkpoint(run.paths.root, task.rewind)
    # Retraining restarts the dense run's schedule: the ticket is a new, smaller network.
    recipe = dense_recipe(run, epochs=task.epochs, start_epoch=0.0,
                          schedule_from=lr_schedule_from(settings), replicate=task.replicate,
                          **recalibration_options(settings))
    log.info("task %s: %s channels at ratio %.3g drawn at %s, %d epochs", task.task_id,
             task.criterion, task.ratio, task.rewind, recipe.epochs)

    # Both networks are measured as built, before anything compiles them: a compiled model's
    # file also holds its compile config, which would count against one network only.
    dense_cost = model_cost(dense)
    small = compact(dense, mask)
    small_cost = model_cost(small)
    draw = _evaluate(dense, recipe)
    before = _evaluate(small, recipe)
    log.info("task %s: compacted %d -> %d params, %d -> %d multiply-adds; accuracy %.4f at the "
             "draw, %.4f compacted", task.task_id, dense_cost["params"], small_cost["params"],
             dense_cost["flops"], small_cost["flops"], draw["accuracy"], before["accuracy"])

    # Every remaining weight of the compacted network trains: no mask to hold.
    checkpoint = EpochCheckpoint.for_mask(grid.partial_state(task.task_id), task.task_id, {},
                                          seed=task.seed)
    trained = retrain(small, {}, recipe, label=task.task_id, checkpoint=checkpoint, stop=stop)
    model_path = save_model(small, grid.compact_model(task.task_id))
    # Speed does not depend on weight values: the rewind checkpoint's dense network and the
    # retrained compact one, each as deployed; the latter's export is kept for deployment.
    small_export = LiteRTModel(small, INFERENCE_BATCH)
    litert_path = small_export.save(grid.compact_litert(task.task_id))
    dense_rate, small_rate = _inference_rates(LiteRTModel(dense, INFERENCE_BATCH), small_export)
    params_fraction = small_cost["params"] / dense_cost["params"]
    return {
        **task.result_fields(), "ratio": float(task.ratio), "criterion": task.criterion,
        "draw": task.rewind, "draw_epoch": task.draw_epoch, "mask_meta": meta,
        "params_dense": dense_cost["params"], "params": small_cost["params"],
        "flops_dense": dense_cost["flops"], "flops": small_cost["flops"],
        "file_bytes_dense": dense_cost["file_bytes"], "file_bytes": small_cost["file_bytes"],
        "images_per_s_dense": dense_rate, "images_per_s": small_rate,
        "inference_runtime": INFERENCE_RUNTIME, "inference_batch": INFERENCE_BATCH,
        "inference_threads": INFERENCE_THREADS,
        "speedup": small_rate / dense_rate if dense_rate > 0 else None,
        "flops_reduction": dense_cost["flops"] / small_cost["flops"] if small_cost["flops"] else None,
        "draw_accuracy": draw["accuracy"], "draw_loss": draw["loss"],
        "accuracy_before": before["accuracy"], "loss_before": before["loss"],
        "accuracy": trained["accuracy"], "loss": trained["loss"],
        "best_accuracy": trained["best_accuracy"], "epochs_to_best": trained["epochs_to_best"],
        # The counterpart of a magnitude point's sparsity: the fraction of parameters removed.
        "sparsity": 1.0 - params_fraction,
        "epochs": trained["epochs"], "history": trained["history"],
        "resumed_from_epoch": trained["resumed_from_epoch"],
        "retrain_time_s": trained["wall_time_s"], "wall_time_s": time.perf_counter() - t0,
        "compact_model": str(model_path.relative_to(grid.root)),
        "compact_litert": str(litert_path.relative_to(grid.root)),
    }
