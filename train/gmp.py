"""Gradual magnitude pruning (GMP) of a dense run: the hook that updates the masks on schedule.

The schedule (`train.gmp_schedule`) names the global steps at which masks are recomputed; the
driver makes every engine pause exactly there (these steps are the hook's `pause_steps`) and
`GradualPruning.on_step` then, on every process of the run:
  1. reads the pruned kernels and their current masks (the growing-mask optimizer's variables,
     `train.masked_optimizer`),
  2. prunes the smallest magnitudes until the schedule's sparsity (scope global: one threshold
     over every pruned kernel; layer: the same fraction in each), never reviving a pruned weight,
  3. assigns the masks and zeroes the newly pruned weights.
The optimizer keeps pruned weights at zero between updates, for every optimizer. Every process
computes the same masks from the same weights, so multiworker workers agree without talking; the
elephas driver's masks reach the workers in the next round's optimizer state.

Files (chief only), beside the usual dense-run files:
    gmp/updates.json                 the schedule and one record per update: step, epoch (a float),
                                     target and realised sparsity, pruned / total weights, mask file
    gmp/masks/step-<NNNNNNNNN>.npz   the masks set at that step (`train.magnitude.save_mask`
                                     format, which `lottery.prune.masks.load_mask` reads)
and history.csv gains the realised sparsity at each epoch's end (column `sparsity`).

Resume: the masks are optimizer variables, so the resume weights file restores them with the
weights; on restart the records and mask files of updates after the last complete epoch (made
before the kill, made again identically now) are dropped.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from common.atomic import read_json, write_json
from common.paths import DenseRunPaths
from train.gmp_schedule import schedule_from_settings
from train.hooks import EpochHook, LoopState
from train.magnitude import excluded_names, magnitude_mask, save_mask
from train.masked_optimizer import gmp_inner, gmp_prunable
from train.settings import DenseSettings

log = logging.getLogger(__name__)


def gmp_dir(run: DenseRunPaths) -> Path:
    return run.root / "gmp"


def mask_file(run: DenseRunPaths, step: int) -> Path:
    return gmp_dir(run) / "masks" / f"step-{step:09d}.npz"


def read_updates(run: DenseRunPaths) -> list[dict]:
    path = gmp_dir(run) / "updates.json"
    return list(read_json(path)["updates"]) if path.is_file() else []


def check_exclusions(model, settings: DenseSettings) -> None:
    """ValueError naming gmp_exclude when a pattern matches no prunable kernel, or all of them."""
    names = [v.path for v in model.trainable_variables
             if gmp_prunable(v.path, v.name, (), settings.gmp_prune_depthwise)]
    try:
        excluded = excluded_names(names, settings.gmp_exclude)
    except ValueError as err:
        raise ValueError(f"gmp_exclude: {err}") from None
    if len(excluded) == len(names):
        raise ValueError(f"gmp_exclude: {list(settings.gmp_exclude)} excludes every prunable kernel")


def current_masks(model) -> dict[str, np.ndarray]:
    """The masks the model's growing-mask optimizer holds now, as booleans by variable path."""
    opt = gmp_inner(model.optimizer)
    return {path: np.asarray(mask.numpy()) > 0.5 for path, (_, mask) in opt.gmp_masks().items()}


def realised_sparsity(masks: dict[str, np.ndarray]) -> tuple[int, int]:
    """(pruned, total) over the masked weights."""
    total = sum(m.size for m in masks.values())
    return total - sum(int(np.count_nonzero(m)) for m in masks.values()), total


def prune_to(model, sparsity: float, scope: str) -> dict[str, np.ndarray]:
    """Grow the optimizer's masks to `sparsity` by magnitude and zero the pruned weights."""
    pairs = gmp_inner(model.optimizer).gmp_masks()
    weights = {path: np.asarray(var.numpy()) for path, (var, _) in pairs.items()}
    base = {path: np.asarray(mask.numpy()) > 0.5 for path, (_, mask) in pairs.items()}
    new = magnitude_mask(weights, sparsity, scope, base=base)
    for path, (var, mask) in pairs.items():
        keep = new[path]
        mask.assign(keep.astype(mask.dtype))
        var.assign(np.where(keep, weights[path], np.zeros((), weights[path].dtype)))
    return new


class GradualPruning(EpochHook):
    """Mask updates at the schedule's steps (module docstring); every process, files on the chief."""

    def __init__(self, settings: DenseSettings, run: DenseRunPaths, model, chief: bool,
                 steps_per_epoch: int):
        self.settings, self.run, self.model, self.chief = settings, run, model, chief
        self.spe = steps_per_epoch
        self.schedule = schedule_from_settings(settings, steps_per_epoch * settings.epochs)
        if gmp_inner(model.optimizer) is None:
            raise RuntimeError("gradual pruning needs the engine's growing-mask optimizer "
                               "(train.masked_optimizer.gmp_optimizer)")
        check_exclusions(model, settings)
        self.pause_steps = frozenset(s for s in self.schedule.update_steps() if s > 0)
        self.updates: list[dict] = []

    def on_train_begin(self, state: LoopState) -> bool:
        done = state.epochs_done * self.spe
        if self.chief:
            kept = [u for u in read_updates(self.run) if u["step"] <= done]
            for path in (gmp_dir(self.run) / "masks").glob("step-*.npz"):
                if int(path.stem.split("-")[1]) > done:
                    path.unlink()  # made after the last complete epoch: made again below
            self.updates = kept
            self._write_records()
        if done == 0 and self.schedule.is_update_step(0):
            self._update(0)
        return False

    def on_step(self, step: int, state: LoopState) -> None:
        if self.schedule.is_update_step(step):
            self._update(step)

    def on_epoch_end(self, epoch: int, row: dict[str, float], state: LoopState) -> bool:
        pruned, total = realised_sparsity(current_masks(self.model))
        row["sparsity"] = pruned / total
        return False

    def _update(self, step: int) -> None:
        target = self.schedule.sparsity(step)
        masks = prune_to(self.model, target, self.settings.gmp_scope)
        pruned, total = realised_sparsity(masks)
        log.debug("GMP step %d: sparsity %.4f (target %.4f)", step, pruned / total, target)
        if not self.chief:
            return
        path = mask_file(self.run, step)
        meta = {"step": step, "target_sparsity": target, "sparsity": pruned / total,
                "scope": self.settings.gmp_scope}
        save_mask(path, masks, meta)
        self.updates.append({"step": step, "epoch": step / self.spe, "target_sparsity": target,
                             "sparsity": pruned / total, "pruned": pruned, "total": total,
                             "mask_file": str(path.relative_to(self.run.root))})
        self._write_records()

    def _write_records(self) -> None:
        write_json(gmp_dir(self.run) / "updates.json",
                   {"schedule": self.schedule.to_dict(), "scope": self.settings.gmp_scope,
                    "exclude": list(self.settings.gmp_exclude), "updates": self.updates})
