"""Iterative magnitude pruning (IMP) with rewinding: one chain of rounds is one schedulable unit.

Round r (1..R) prunes `rate` of the weights still kept after round r-1, judged by the magnitudes of
round r-1's trained weights (round 0 is the dense run's final weights), rewinds the kept weights to
the rewind point and retrains. After R rounds the sparsity is 1 - (1 - rate)^R.

Resumable by round, with the mask files as the only state (masks/<task_id>-rNN.npz):
  1. after training round r, the mask of round r+1 (computed from round r's trained weights) is
     written, then round r's mask file is rewritten with the round's result in its metadata;
  2. a round whose mask file carries a result is complete; a re-run skips it and starts from the
     first round without one, whose mask is already on disk.
Every write is atomic, so a kill at any point loses at most the round being trained.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from common.paths import GridPaths
from lottery.prune import masks as masks_mod
from lottery.points.oneshot import Recipe, retrain

log = logging.getLogger(__name__)


def round_mask_id(task_id: str, round_index: int) -> str:
    return f"{task_id}-r{round_index:02d}"


def run_imp(load_rewind: Callable[[], Any], final_weights: Mapping[str, np.ndarray], recipe: Recipe, *,
            rounds: int, rate: float, mask_path: Callable[[int], Path], scope: str = "global",
            exclude: Iterable[str] = (), label: str = "imp") -> list[dict[str, Any]]:
    """Run (or resume) a chain; returns every round's result in order.

    load_rewind: returns a model holding the rewind weights (called once per round trained).
    final_weights: the dense run's trained prunable weights (round 0).
    mask_path: round -> file of that round's mask (and, once complete, its result).
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
        result = {"round": r, **retrain(model, mask, recipe, label=f"{label} r{r}")}
        if r < rounds:
            from lottery.prune.stats import prunable_weights

            trained = prunable_weights(model)
            following = masks_mod.prune_remaining(trained, mask, rate, scope, exclude)
            masks_mod.save_mask(mask_path(r + 1), following,
                                {"round": r + 1, "rate": rate, "scope": scope, "exclude": list(exclude),
                                 "sparsity": masks_mod.mask_sparsity(following)})
        # Written last: its presence marks the round complete.
        masks_mod.save_mask(path, mask, {**meta, "result": result})
        results.append(result)
    return results


def run_imp_task(run_dir: str | os.PathLike, grid_dir: str | os.PathLike, task: Mapping[str, Any],
                 settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A grid task of kind "imp": the whole chain; the result is the last round's plus all rounds."""
    import keras

    from lottery.points.oneshot import task_fields, dense_recipe, open_dense_run
    from lottery.prune.stats import prunable_weights
    from train.checkpoints import load_checkpoint
    from train.local_engine import configure_tensorflow

    for field in ("task_id", "rewind", "imp_rounds", "imp_rate"):
        if field not in task:
            raise ValueError(f"task {task.get('task_id', '?')}: field {field!r} is missing")
    if task.get("control", "none") != "none":
        raise ValueError(f"task {task['task_id']}: IMP chains take no control (got {task['control']!r})")
    grid = GridPaths(Path(grid_dir))
    run = open_dense_run(run_dir)
    configure_tensorflow(run.settings)
    keras.utils.set_random_seed(int(task.get("seed", 0)))
    final = prunable_weights(load_checkpoint(run.paths.root, "final"))
    recipe = dense_recipe(run, epochs=task.get("epochs"), start_epoch=run.position(task["rewind"]))
    task_id = str(task["task_id"])
    rounds = run_imp(lambda: load_checkpoint(run.paths.root, task["rewind"]), final, recipe,
                     rounds=int(task["imp_rounds"]), rate=float(task["imp_rate"]),
                     mask_path=lambda r: grid.mask(round_mask_id(task_id, r)),
                     scope=str(task.get("scope", "global")), exclude=task.get("exclude", ()),
                     label=task_id)
    last = rounds[-1]
    return {**task_fields(task), **last, "mask_id": round_mask_id(task_id, last["round"]),
            "rounds": rounds}
