"""The task list of a grid: which points its resolved settings ask for, and their ids and seeds.

Split from lottery.grid.plan (which writes the grid directory) so that the list itself is a pure
function of the settings, the checkpoints' positions and the masks' real sparsities.

Axes beside the thresholds, rewind points and controls:
  replicates     replicate r of every point (ids end in -rep<r>, r >= 1; replicate 0 keeps the
                 ids grids had before replicates existed). A replicate has its own task seeds and
                 its own random masks (masks/<mask>-random<seed>.npz drawn with a seed of the
                 replicate); its data order is drawn by the runner from the replicate number.
  retrain_modes  weights (today's points), lr, finetune: one-shot masks only. lr and finetune start
                 from the dense run's final weights, so the random_reinit control (which discards
                 the weights) is planned for weights only; random_mask is planned for every mode.
                 finetune ignores the rewind point (its rate is constant): one finetune point per
                 mask, control and replicate, recorded with rewind "final".
  replicate_runs replicate r >= 1 retrains dense run r (same configuration, another seed): its task
                 names the run (Task.run) and its masks are drawn from that run's final weights.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.settings import SettingsError
from lottery.grid.ids import (
    channel_mask_id,
    derived_seed,
    imp_task_id,
    mask_id,
    oneshot_task_id,
    random_mask_id,
    replicate_suffix,
    structured_task_id,
    variant_task_id,
)
from lottery.grid.plan_gmp import gmp_tasks
from lottery.grid.settings import GridSettings
from lottery.points.task import RETRAIN_MODES, Task

log = logging.getLogger(__name__)

# Axes a planned grid can grow along (more replicates, another retraining mode): left out of the
# directory name, so planning again with more extends the grid in place and only new points run.
EXTENSIBLE_FIELDS = ("replicates", "retrain_modes")




def replicate_mask_id(settings: GridSettings, mid: str, replicate: int) -> str:
    """The magnitude mask replicate `replicate` uses: `mid` itself, except in a grid over replicate
    dense runs, where replicate r >= 1 prunes its own run's final weights (mask <mid>-rep<r>)."""
    return mid + replicate_suffix(replicate) if settings.replicate_runs else mid


def replicate_run(settings: GridSettings, replicate: int) -> str | None:
    """The dense run (directory name) of replicate `replicate`; None: the grid's own run."""
    return settings.replicate_runs[replicate - 1] if settings.replicate_runs and replicate else None


def random_mask_ids(settings: GridSettings, mid: str) -> list[str]:
    """The random twin of mask `mid` for each replicate (index = replicate). Replicate 0's is the
    twin grids had before replicates existed; replicate r draws with a seed of its own."""
    out = []
    for replicate in range(settings.replicates):
        base = replicate_mask_id(settings, mid, replicate)
        out.append(random_mask_id(base, random_mask_seed(settings, mid, replicate)))
    return out


def random_mask_seed(settings: GridSettings, mid: str, replicate: int) -> int:
    return derived_seed(settings.seed, mid + replicate_suffix(replicate))


def _mode_points(settings: GridSettings, mode: str) -> list[tuple[str, str]]:
    """(rewind, control) pairs a one-shot mask gets in retraining mode `mode`."""
    if mode == "weights":
        controls = ("none", *settings.controls)
    else:
        controls = ("none", *(c for c in settings.controls if c == "random_mask"))
    rewinds = ("final",) if mode == "finetune" else settings.rewind
    return [(rewind, control) for rewind in rewinds for control in controls]


def build_tasks(settings: GridSettings, positions: Mapping[str, float],
                mask_sparsity: Mapping[str, float]) -> list[Task]:
    """The deterministic task list of resolved settings: longest first (cost descending), then
    earliest rewind, then id, so a dynamic scheduler that hands them out in order finishes the long
    ones early."""
    if settings.epochs is None:
        raise ValueError("build_tasks needs resolved settings (epochs set)")
    tasks: list[Task] = []
    common = {"scope": settings.scope, "exclude": tuple(settings.exclude), "epochs": settings.epochs}
    for kind, value in settings.thresholds:
        mid = mask_id(settings.scope, kind, value)
        threshold = {"kind": "sparsity" if kind == "s" else "quantile", "value": value}
        random_ids = random_mask_ids(settings, mid) if "random_mask" in settings.controls else []
        for replicate in range(settings.replicates):
            for mode in settings.retrain_modes:
                for rewind, control in _mode_points(settings, mode):
                    task_id = variant_task_id(oneshot_task_id(mid, rewind, control), mode, replicate)
                    own = replicate_mask_id(settings, mid, replicate)
                    use_mask = random_ids[replicate] if control == "random_mask" else own
                    tasks.append(Task(
                        task_id=task_id, kind="oneshot", mask_id=use_mask,
                        base_mask_id=own if control == "random_mask" else None,
                        run=replicate_run(settings, replicate),
                        rewind=rewind, control=control, threshold=threshold,
                        sparsity=float(mask_sparsity[use_mask]), imp_rounds=0, imp_rate=0.0,
                        seed=derived_seed(settings.seed, task_id), cost=float(settings.epochs),
                        replicate=replicate, retrain_mode=mode, **common,
                    ))
    if settings.imp_rounds:
        final_sparsity = 1.0 - (1.0 - settings.imp_rate) ** settings.imp_rounds
        for replicate in range(settings.replicates):
            for rewind in settings.rewind:
                task_id = imp_task_id(settings.scope, settings.imp_rounds, settings.imp_rate,
                                      rewind) + replicate_suffix(replicate)
                tasks.append(Task(
                    task_id=task_id, kind="imp", mask_id=None, base_mask_id=None,
                    rewind=rewind, control="none", threshold=None,
                    sparsity=final_sparsity, imp_rounds=settings.imp_rounds,
                    imp_rate=settings.imp_rate, seed=derived_seed(settings.seed, task_id),
                    cost=float(settings.epochs * settings.imp_rounds), replicate=replicate,
                    run=replicate_run(settings, replicate), **common,
                ))
    if settings.structured:
        tasks += structured_tasks(settings, positions)
    tasks += gmp_tasks(settings)  # gmp_sparsities (lottery.grid.plan_gmp)
    tasks.sort(key=lambda t: (-t.cost, positions.get(t.rewind, float("inf")), t.task_id))
    return tasks


def structured_tasks(settings: GridSettings, positions: Mapping[str, float]) -> list[Task]:
    """One task per (draw point, channel ratio, replicate) of resolved settings."""
    scope = settings.resolved_channel_scope
    tasks = []
    for draw in settings.draw_points:
        for ratio in settings.channel_ratios or ():
            mid = channel_mask_id(settings.criterion, scope, ratio, draw, settings.channel_round_to)
            for replicate in range(settings.replicates):
                task_id = structured_task_id(mid) + replicate_suffix(replicate)
                tasks.append(Task(
                    task_id=task_id, kind="structured", mask_id=mid, base_mask_id=None,
                    rewind=draw, control="none", scope=scope, threshold=None,
                    sparsity=None, ratio=ratio, criterion=settings.criterion,
                    draw_epoch=float(positions[draw]), exclude=tuple(settings.exclude),
                    epochs=settings.epochs, imp_rounds=0, imp_rate=0.0,
                    seed=derived_seed(settings.seed, task_id), cost=float(settings.epochs),
                    round_to=settings.channel_round_to if settings.channel_round_to > 1 else None,
                    replicate=replicate,
                ))
    return tasks


def check_unique_ids(settings: GridSettings) -> None:
    """SettingsError naming the id when two values of `settings` would get the same mask id (and
    so the same task ids): ids keep 4 decimals of a fraction (lottery.grid.ids.fraction_tag)."""
    scope = settings.resolved_channel_scope
    named = [("sparsities" if kind == "s" else "quantiles", value, mask_id(settings.scope, kind, value))
             for kind, value in settings.thresholds]
    named += [("channel_ratios", ratio, channel_mask_id(settings.criterion, scope, ratio, draw,
                                                        settings.channel_round_to))
              for draw in settings.draw_points for ratio in settings.channel_ratios or ()]
    seen: dict[str, float] = {}
    for field, value, mid in named:
        if mid in seen:
            raise SettingsError(f"{field}: {seen[mid]} and {value} would share the id {mid!r} "
                                f"(ids keep 4 decimals): give values that differ there")
        seen[mid] = value


def without_extensible(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A grid identity without its extensible axes: what must match to extend a grid."""
    return {k: v for k, v in identity.items() if k not in EXTENSIBLE_FIELDS}


def merge_extensible(settings: GridSettings, recorded: Mapping[str, Any]) -> GridSettings:
    """`settings` grown to cover what the planned grid already has: the larger number of
    replicates and every retraining mode of either (a grid never loses planned points)."""
    replicates = max(settings.replicates, int(recorded.get("replicates") or 1))
    modes = set(settings.retrain_modes) | set(recorded.get("retrain_modes") or ["weights"])
    return dataclasses.replace(settings, replicates=replicates,
                               retrain_modes=tuple(m for m in RETRAIN_MODES if m in modes))


def check_extension(plan_file: Path, old: Sequence[Mapping[str, Any]], new: Sequence[Task]) -> None:
    """An extended plan keeps every planned task exactly (their results stay valid)."""
    planned = {t.task_id: t.to_dict() for t in new}
    for record in old:
        task_id = record.get("task_id") if isinstance(record, Mapping) else None
        if planned.get(task_id) != record:
            raise SettingsError(f"{plan_file}: extending the grid would change or drop its task "
                                f"{task_id!r}; plan a new grid instead")
    log.info("%d new task(s) planned beside %d", len(new) - len(old), len(old))
