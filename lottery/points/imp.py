"""Iterative magnitude pruning (IMP) with rewinding: one chain of rounds is one schedulable unit.

Round r (1..R) prunes `rate` of the weights still kept after round r-1, judged by the magnitudes of
round r-1's trained weights (round 0 is the dense run's final weights), rewinds the kept weights to
the rewind point and retrains. After R rounds the sparsity is 1 - (1 - rate)^R.

Resumable by round, with the mask files as the record of the chain (masks/<task_id>-rNN.npz):
  1. after training round r, the mask of round r+1 (computed from round r's trained weights) is
     written, then round r's mask file is rewritten with the round's result in its metadata;
  2. a round whose mask file carries a result is complete; a re-run skips it and starts from the
     first round without one, whose mask is already on disk.
Every write is atomic, so a kill at any point loses at most the round being trained; with a
`state_dir` (the point's partial state) not even that: the round being trained resumes from its
last complete epoch, and a round's saved epochs are forgotten once its mask file holds its result.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from common.paths import GridPaths
from common.stop import StopToken
from lottery.points.epoch_checkpoint import EpochCheckpoint
from lottery.points.point_metrics import recalibration_options
from lottery.points.point_weights import save_point_weights
from lottery.points.recipe import Recipe, dense_recipe, lr_schedule_from, open_dense_run, retrain
from lottery.points.task import Task, TaskError
from lottery.prune import masks as masks_mod
from lottery.prune.stats import prunable_weights
from train.checkpoints import load_checkpoint
from train.local_engine import configure_tensorflow

log = logging.getLogger(__name__)


def round_mask_id(task_id: str, round_index: int) -> str:
    return f"{task_id}-r{round_index:02d}"


def run_imp(load_rewind: Callable[[], Any], final_weights: Mapping[str, np.ndarray], recipe: Recipe, *,
            rounds: int, rate: float, mask_path: Callable[[int], Path], scope: str = "global",
            exclude: Iterable[str] = (), label: str = "imp", state_dir: str | os.PathLike | None = None,
            seed: int = 0, stop: StopToken | None = None,
            save_final: Callable[[Any], None] | None = None) -> list[dict[str, Any]]:
    """Run (or resume) a chain; returns every round's result in order.

    load_rewind: returns a model holding the rewind weights (called once per round trained).
    final_weights: the dense run's trained prunable weights (round 0).
    mask_path: round -> file of that round's mask (and, once complete, its result).
    state_dir: where the round being trained saves its complete epochs (an EpochCheckpoint per
    round, seeded with `seed`); None trains without. stop: see lottery.points.recipe.retrain.
    """
    if rounds < 1:
        raise ValueError(f"imp_rounds must be >= 1, got {rounds}")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"imp_rate must lie strictly between 0 and 1, got {rate}")
    exclude = tuple(exclude)
    results: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        path = Path(mask_path(r))
        if path.is_file():
            mask, meta = masks_mod.load_mask(path)
            if "result" in meta:
                results.append(meta["result"])
                continue
        elif r == 1:
            mask = masks_mod.prune_remaining(final_weights, masks_mod.ones_like(final_weights), rate,
                                             scope, exclude)
            meta = {"round": 1, "rate": rate, "scope": scope, "exclude": list(exclude),
                    "sparsity": masks_mod.mask_sparsity(mask)}
            masks_mod.save_mask(path, mask, meta)
        else:
            raise FileNotFoundError(
                f"{path}: IMP round {r} has no mask although round {r - 1} is complete "
                f"(was {Path(mask_path(r - 1))} written by another chain?)")
        log.info("%s round %d/%d: sparsity %.4f", label, r, rounds, meta["sparsity"]["overall"])
        model = load_rewind()
        round_label = f"{label} r{r}"
        checkpoint = None
        if state_dir is not None:
            checkpoint = EpochCheckpoint.for_mask(state_dir, round_label, mask, seed=seed)
        result = {"round": r, **retrain(model, mask, recipe, label=round_label, checkpoint=checkpoint,
                                        stop=stop)}
        if r < rounds:
            trained = prunable_weights(model)
            following = masks_mod.prune_remaining(trained, mask, rate, scope, exclude)
            masks_mod.save_mask(mask_path(r + 1), following,
                                {"round": r + 1, "rate": rate, "scope": scope, "exclude": list(exclude),
                                 "sparsity": masks_mod.mask_sparsity(following)})
        if r == rounds and save_final is not None:
            save_final(model)  # the chain's final network, before the round counts as complete
        # Written last: its presence marks the round complete.
        masks_mod.save_mask(path, mask, {**meta, "result": result})
        if checkpoint is not None:
            checkpoint.clear()  # the round's result is in its mask file now
        results.append(result)
    return results


def check_imp_task(task: Task) -> None:
    """What a task of kind "imp" needs beyond a valid Task (TaskError naming the task and field)."""
    def bad(field: str, why: str) -> TaskError:
        return TaskError(f"task {task.task_id!r}: field {field} {why}")

    if task.control != "none":
        raise bad("control", f"is {task.control!r}; IMP chains take no control ('none')")
    if task.retrain_mode != "weights":  # the chain rewinds its weights every round
        raise bad("retrain_mode", f"is {task.retrain_mode!r}; IMP chains rewind weights ('weights')")
    if task.imp_rounds < 1:
        raise bad("imp_rounds", f"must be >= 1 for an IMP chain, got {task.imp_rounds}")
    if not 0.0 < task.imp_rate < 1.0:
        raise bad("imp_rate", f"must lie strictly between 0 and 1, got {task.imp_rate}")


def run_imp_task(run_dir: str | os.PathLike, grid_dir: str | os.PathLike, task: Task,
                 settings: Mapping[str, Any] | None = None, stop: StopToken | None = None
                 ) -> dict[str, Any]:
    """A grid task of kind "imp": the whole chain; the result is the last round's plus all rounds."""
    import keras

    check_imp_task(task)
    grid = GridPaths(Path(grid_dir))
    run = open_dense_run(run_dir)
    configure_tensorflow(run.settings)
    keras.utils.set_random_seed(task.seed)
    final = prunable_weights(load_checkpoint(run.paths.root, "final"))
    recipe = dense_recipe(run, epochs=task.epochs, start_epoch=run.position(task.rewind),
                          schedule_from=lr_schedule_from(settings), replicate=task.replicate,
                          **recalibration_options(settings))
    rounds = run_imp(lambda: load_checkpoint(run.paths.root, task.rewind), final, recipe,
                     rounds=task.imp_rounds, rate=task.imp_rate,
                     mask_path=lambda r: grid.mask(round_mask_id(task.task_id, r)),
                     scope=task.scope, exclude=task.exclude, label=task.task_id,
                     state_dir=grid.partial_state(task.task_id), seed=task.seed, stop=stop,
                     save_final=lambda model: save_point_weights(grid.root, task.task_id, model))
    last = rounds[-1]
    return {**task.result_fields(), **last, "mask_id": round_mask_id(task.task_id, last["round"]),
            "rounds": rounds}
