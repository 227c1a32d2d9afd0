"""Planning a lottery grid: its directory, weight statistics, masks and the task list.

`plan(run_dir, settings)` is idempotent: the grid directory is named by the hash of the resolved
settings, every mask file is written only if missing, and `settings.json` (which holds the task
list) is written last, so its presence means the plan is complete; planning again changes nothing.
The exception is growth along the extensible axes (EXTENSIBLE_FIELDS: replicates, retrain_modes),
which are not part of the directory name: planning again with more replicates or another mode
rewrites settings.json with every old task unchanged plus the new ones (never fewer), so a run
afterwards trains only the new points. Workers that loaded the old list finish it; the next launch
sees the new one. The task list itself is built by lottery.grid.task_list.

A task is one schedulable unit (lottery.points.task.Task, where its fields are described). The
plan refuses settings whose values would share an id (ids keep 4 decimals of a fraction) before it
writes anything, and checks every task and the uniqueness of their ids again before writing them.
Tasks are ordered longest first (cost descending), then earliest rewind first, so a dynamic
scheduler that hands them out in order finishes the long ones early.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from common.atomic import read_json, write_json
from common.paths import SUCCESS, DenseRunPaths, GridPaths
from common.settings import SCHEMA_VERSION, SettingsError, identity_hash, settings_to_dict
from lottery.grid.ids import channel_mask_id, mask_id
from lottery.grid.plan_gmp import GMP_GRID_DEFAULTS
from lottery.grid.replicate_runs import check_replicate_runs
from lottery.grid.settings import EARLY_BIRD, GridSettings
from lottery.grid.task_list import (  # noqa: F401 (build_tasks, structured_tasks: re-exported)
    EXTENSIBLE_FIELDS,
    build_tasks,
    check_extension,
    check_unique_ids,
    merge_extensible,
    random_mask_ids,
    random_mask_seed,
    replicate_mask_id,
    replicate_run,
    structured_tasks,
    without_extensible,
)
from lottery.points.task import Task, TaskError
from lottery.prune import masks
from lottery.prune.channel_masks import select_channels
from lottery.prune.stats import prunable_weights, weight_stats
from train.adversarial import ADV_DEFAULTS
from train.checkpoints import RewindPoint, list_checkpoints, load_checkpoint

log = logging.getLogger(__name__)

PLAN_KIND = "lottery-grid"


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the grid needs to know about a finished dense run."""

    paths: DenseRunPaths
    epochs: int
    saved_points: tuple[str, ...]          # checkpoint names: init, final, 3ep, ...
    positions: Mapping[str, float]         # checkpoint name -> position in training (epochs)


def _point_position(name: str, epochs: int, steps_per_epoch: int | None) -> float | None:
    if name == "init":
        return 0.0
    if name == "final":
        return float(epochs)
    point = RewindPoint.parse(name)
    if point.unit == "ep":
        return float(point.count)
    return None if not steps_per_epoch else point.count / steps_per_epoch


def read_run(run_dir: str | os.PathLike) -> RunInfo:
    """Check that `run_dir` is a finished dense run; its epochs and saved checkpoints."""
    run = DenseRunPaths(Path(run_dir))
    if not run.settings.is_file():
        raise SettingsError(f"--run {run.root}: not a dense run directory (no settings.json)")
    if not run.success.is_file():
        raise SettingsError(f"--run {run.root}: the dense run is not finished (no {SUCCESS})")
    saved = read_json(run.settings)
    dense = saved.get("settings", saved) if isinstance(saved, dict) else {}
    epochs = dense.get("epochs") if isinstance(dense, dict) else None
    if not isinstance(epochs, int) or epochs < 1:
        raise SettingsError(f"{run.settings}: field settings.epochs is missing or invalid")
    steps = saved.get("steps_per_epoch")
    points = tuple(list_checkpoints(run))
    if not points:
        raise SettingsError(f"{run.checkpoints}: the dense run saved no checkpoints")
    positions: dict[str, float] = {}
    unknown = []
    for name in points:
        try:
            pos = _point_position(name, epochs, steps if isinstance(steps, int) else None)
        except ValueError:
            continue  # a checkpoint name that is not a rewind point (never offered)
        if pos is None:
            unknown.append(name)
        else:
            positions[name] = pos
    if unknown:
        # Without steps per epoch an 'it' point cannot be compared with an 'ep' point; the
        # checkpoint files were written in training order, so their mtimes order them.
        log.warning("%s: no steps_per_epoch; ordering %s by checkpoint time", run.settings, unknown)
        times = {n: run.checkpoint(n).stat().st_mtime_ns for n in points}
        for name in unknown:
            before = [positions[n] for n in positions if times[n] <= times[name]]
            positions[name] = max(before, default=0.0) + 1e-6
    return RunInfo(run, epochs, tuple(n for n in points if n in positions), positions)


def resolve_settings(settings: GridSettings, run: RunInfo) -> GridSettings:
    """Fill the defaults that come from the dense run; check rewinds and draw points against its
    checkpoints (and its Early-Bird ticket, if the grid draws one)."""
    for field, labels in (("rewind", settings.rewind), ("draw", settings.draw)):
        for label in labels:
            if label not in run.saved_points:
                raise SettingsError(
                    f"{field}: {label!r} is not a saved point of the dense run {run.paths.root} "
                    f"(saved: {', '.join(run.saved_points)})")
    if settings.early_bird:
        early_bird_epoch(run)  # raises naming early_bird.json
    if settings.epochs is None:
        settings = dataclasses.replace(settings, epochs=run.epochs)
    if settings.structured and settings.channel_scope is None:
        settings = dataclasses.replace(settings, channel_scope=settings.resolved_channel_scope)
    if settings.replicate_runs:  # one replicate per dense run
        settings = dataclasses.replace(settings, replicates=1 + len(settings.replicate_runs))
    return settings


def early_bird_epoch(run: RunInfo) -> int:
    """The epoch at which the dense run drew its Early-Bird ticket; SettingsError naming
    early_bird.json when the run has none (not trained with --early-bird, or never drawn)."""
    path = run.paths.early_bird
    if not path.is_file():
        raise SettingsError(f"early_bird: {path} does not exist: the dense run {run.paths.root} was "
                            f"not trained with --early-bird")
    try:
        record = read_json(path)
    except (OSError, ValueError) as err:
        raise SettingsError(f"early_bird: {path} is not readable ({err})") from None
    if not isinstance(record, dict) or "drawn_epoch" not in record:
        raise SettingsError(f"early_bird: {path}: field drawn_epoch is missing")
    epoch = record["drawn_epoch"]
    if epoch is None:
        raise SettingsError(f"early_bird: {path}: no Early-Bird ticket was drawn (drawn_epoch is "
                            f"null: the masks never settled within the run's epochs)")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= run.epochs:
        raise SettingsError(f"early_bird: {path}: field drawn_epoch is {epoch!r}, expected an "
                            f"epoch in 1..{run.epochs}")
    checkpoint = run.paths.checkpoint(EARLY_BIRD)
    if record.get("checkpoint") != EARLY_BIRD or not checkpoint.is_file():
        raise SettingsError(f"early_bird: {path} names checkpoint {record.get('checkpoint')!r}, "
                            f"but {checkpoint} is missing")
    return epoch


# Fields of a structured grid. A grid without channel ratios leaves them out of its identity, so
# magnitude grids planned before these fields existed keep their directory name and settings.json.
STRUCTURED_FIELDS = ("channel_ratios", "criterion", "channel_scope", "draw", "early_bird",
                     "channel_round_to")
# Fields added after grids were first planned, with the default that reproduces the old grids:
# left out of the identity (and of settings.json) at that default.
LATER_DEFAULTS = {"channel_round_to": 1, "lr_schedule_from": "rewind", "replicates": 1,
                  "retrain_modes": ["weights"], "finetune_lr": None, "replicate_runs": []}
LATER_DEFAULTS.update(ADV_DEFAULTS)  # adversarial retraining (train.adversarial)
LATER_DEFAULTS.update({"bn_recalibration": "auto", "bn_recalibration_batches": 20})
LATER_DEFAULTS.update(GMP_GRID_DEFAULTS)  # GMP points (lottery.grid.plan_gmp)
def grid_identity(settings: GridSettings | Mapping[str, Any]) -> dict[str, Any]:
    """The settings a grid directory is named by and records in settings.json."""
    values = dict(settings) if isinstance(settings, Mapping) else settings_to_dict(settings)
    if values.get("channel_ratios") is None:
        for field in STRUCTURED_FIELDS:
            values.pop(field, None)
    for field, default in LATER_DEFAULTS.items():  # added later: grids planned before keep their names
        if values.get(field) == default:
            values.pop(field)
    return values


def grid_hash(settings: GridSettings) -> str:
    """The name of the grid's directory: its settings as grid_identity records them."""
    omit = EXTENSIBLE_FIELDS + (() if settings.structured else STRUCTURED_FIELDS)
    return identity_hash(settings, omit=omit, omit_defaults=LATER_DEFAULTS)


def load_final_weights(run: DenseRunPaths) -> dict[str, np.ndarray]:
    """The prunable weights of the dense run's final checkpoint (imports TensorFlow)."""
    return prunable_weights(load_checkpoint(run.root, "final"))


def _make_mask(weights: Mapping[str, np.ndarray], settings: GridSettings, kind: str, value: float):
    exclude = tuple(settings.exclude)
    try:
        if kind == "q":
            return masks.mask_from_quantile(weights, value, scope=settings.scope, exclude=exclude)
        if settings.scope == "global":
            return masks.global_magnitude_mask(weights, value, exclude=exclude)
        return masks.layerwise_magnitude_mask(weights, value, exclude=exclude)
    except ValueError as err:  # e.g. an exclude pattern that matches no weight
        raise SettingsError(f"exclude: {err}" if "exclude" in str(err) else str(err)) from None


def _write_masks(grid: GridPaths, settings: GridSettings, weights: Callable[[], Mapping[str, np.ndarray]],
                 replicate: int = 0) -> dict[str, dict[str, Any]]:
    """masks/<id>.npz for every threshold of replicate `replicate` (and its random twin); returns
    id -> description. `weights` gives the final weights the magnitude masks are drawn from,
    loaded only when a mask is missing."""
    described: dict[str, dict[str, Any]] = {}
    for kind, value in settings.thresholds:
        mid = mask_id(settings.scope, kind, value)
        own = replicate_mask_id(settings, mid, replicate)
        wanted = [(own, None)] if replicate == 0 or own != mid else []
        if "random_mask" in settings.controls:  # one random twin per replicate
            wanted.append((random_mask_ids(settings, mid)[replicate], own))
        for this_id, base in wanted:
            path = grid.mask(this_id)
            if path.is_file():
                mask, _meta = masks.load_mask(path)
            elif base is None:
                mask = _make_mask(weights(), settings, kind, value)
            else:
                mask = masks.random_mask_like(masks.load_mask(grid.mask(base))[0],
                                              seed=random_mask_seed(settings, mid, replicate))
            real = masks.mask_sparsity(mask)
            meta = {"mask_id": this_id, "scope": settings.scope, "exclude": list(settings.exclude),
                    "threshold": {"kind": "sparsity" if kind == "s" else "quantile", "value": value},
                    "random_of": base, "sparsity": real}
            if replicate_run(settings, replicate):
                meta["run"] = replicate_run(settings, replicate)
            if not path.is_file():
                masks.save_mask(path, mask, meta)
            described[this_id] = {"file": str(path.relative_to(grid.root)), **meta}
    return described


def _write_channel_masks(grid: GridPaths, settings: GridSettings, run: RunInfo,
                         positions: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """masks/<id>.npz: one structured mask per (draw point, channel ratio), drawn with
    lottery.prune.channel_masks.select_channels on that checkpoint's weights; returns id -> description."""
    scope = settings.resolved_channel_scope
    described: dict[str, dict[str, Any]] = {}
    for draw in settings.draw_points:
        wanted = [(ratio, channel_mask_id(settings.criterion, scope, ratio, draw,
                                          settings.channel_round_to))
                  for ratio in settings.channel_ratios or ()]
        model = None
        for ratio, mid in wanted:
            path = grid.mask(mid)
            if path.is_file():  # written by an earlier, interrupted plan: the same inputs
                _mask, meta = masks.load_mask(path)
            else:
                if model is None:  # one load per checkpoint, and none when every mask exists
                    model = load_checkpoint(run.paths.root, draw)
                try:
                    mask = select_channels(model, settings.criterion, ratio, scope=scope,
                                           exclude=tuple(settings.exclude),
                                           round_to=settings.channel_round_to)
                except ValueError as err:  # criterion bn without BatchNorm, an exclude typo
                    field = "exclude" if "exclude" in str(err) else "criterion"
                    raise SettingsError(f"{field}: checkpoint {draw} of {run.paths.root}: "
                                        f"{err}") from None
                # select_channels' own record (criterion, ratio, scope, groups) plus the draw.
                meta = {**mask.meta, "mask_id": mid, "draw": draw,
                        "draw_epoch": float(positions[draw])}
                masks.save_mask(path, mask, meta)
            described[mid] = {"file": str(path.relative_to(grid.root)),
                              **{k: meta.get(k) for k in ("mask_id", "kind", "criterion", "ratio",
                                                          "scope", "draw", "draw_epoch", "exclude",
                                                          "round_to")}}
    return described


def plan(run_dir: str | os.PathLike, settings: GridSettings, *,
         weights: Mapping[str, np.ndarray] | None = None) -> GridPaths:
    """Write the grid directory of `settings` under the dense run `run_dir`; return its paths.

    `weights` (prunable weights by name) defaults to the run's final checkpoint.
    """
    run = read_run(run_dir)
    resolved = resolve_settings(settings, run)
    if resolved.replicate_runs:  # each replicate run finished, with the same checkpoints
        others = [read_run(run.paths.root.parent / name) for name in resolved.replicate_runs]
        check_replicate_runs(run.paths.settings, [o.paths.settings for o in others])
        for other in others:
            resolve_settings(settings, other)
    check_unique_ids(resolved)  # before anything is written under a shared id
    grid = GridPaths.under(run.paths, grid_hash(resolved))
    existing = None
    if grid.settings.is_file():
        existing = read_json(grid.settings)
        recorded = existing.get("settings") or {}
        if without_extensible(recorded) != without_extensible(grid_identity(resolved)):
            raise SettingsError(f"{grid.settings}: holds other settings than these (hash collision?)")
        resolved = merge_extensible(resolved, recorded)
        if grid_identity(resolved) == recorded:
            if resolved.replicates > settings.replicates or set(resolved.retrain_modes) - set(
                    settings.retrain_modes):
                log.info("grid %s keeps its %d replicate(s) and modes %s (a plan never drops "
                         "points)", grid.root, resolved.replicates, ",".join(resolved.retrain_modes))
            log.info("grid already planned: %s", grid.root)
            return grid
        log.info("extending %s to %d replicate(s), retraining modes %s", grid.root,
                 resolved.replicates, ",".join(resolved.retrain_modes))
    grid.root.mkdir(parents=True, exist_ok=True)
    positions = dict(run.positions)
    if resolved.early_bird:
        positions[EARLY_BIRD] = float(early_bird_epoch(run))
    if weights is None:
        weights = load_final_weights(run.paths)
    if not grid.stats.is_file():
        write_json(grid.stats, weight_stats(weights))
    described: dict[str, dict[str, Any]] = {}
    for replicate in range(resolved.replicates):
        other = replicate_run(resolved, replicate)
        final = (functools.cache(functools.partial(load_final_weights,
                                                   DenseRunPaths(run.paths.root.parent / other)))
                 if other else (lambda: weights))
        described.update(_write_masks(grid, resolved, final, replicate))
    sparsity = {k: float(v["sparsity"]["overall"] if isinstance(v["sparsity"], dict)
                         else v["sparsity"]) for k, v in described.items()}
    if resolved.structured:
        described.update(_write_channel_masks(grid, resolved, run, positions))
    tasks = _checked_tasks(build_tasks(resolved, positions, sparsity), where="plan")
    if existing is not None:
        check_extension(grid.settings, existing.get("tasks") or [], tasks)
    write_json(grid.settings, {
        "schema_version": SCHEMA_VERSION, "kind": PLAN_KIND, "hash": grid.root.name.split("-", 1)[1],
        "settings": grid_identity(resolved),
        "run": {"epochs": run.epochs, "saved_points": list(run.saved_points),
                "positions": positions},
        "masks": described, "tasks": [t.to_dict() for t in tasks],
    })
    log.info("planned %d tasks in %s", len(tasks), grid.root)
    return grid


def write_plan(grid: GridPaths, settings: Mapping[str, Any], tasks: Sequence[Task | Mapping[str, Any]],
               extra: Mapping[str, Any] | None = None) -> GridPaths:
    """Write a grid's settings.json with an explicit task list (for workloads planned elsewhere,
    e.g. benchmarks of the scheduler). `plan` is the normal way to create a grid."""
    checked = _checked_tasks(tasks, where="write_plan")
    write_json(grid.settings, {"schema_version": SCHEMA_VERSION, "kind": PLAN_KIND,
                               "settings": dict(settings), "tasks": [t.to_dict() for t in checked],
                               **dict(extra or {})})
    return grid


def _checked_tasks(records: Sequence[Task | Mapping[str, Any]], *, where: str) -> list[Task]:
    """Tasks validated (TaskError names the task and field) with unique ids."""
    tasks = [r if isinstance(r, Task) else Task.from_dict(r) for r in records]
    seen: set[str] = set()
    for t in tasks:
        if t.task_id in seen:
            raise ValueError(f"{where}: task id {t.task_id!r} is planned twice")
        seen.add(t.task_id)
    return tasks


def load_plan(grid_dir: str | os.PathLike) -> dict[str, Any]:
    """The grid's settings.json; SettingsError naming the file if it is not a complete plan."""
    grid = GridPaths(Path(grid_dir))
    if not grid.settings.is_file():
        raise SettingsError(f"--grid {grid.root}: not a planned lottery grid (no settings.json; "
                            f"run `bigticket lottery plan` first)")
    record = read_json(grid.settings)
    if not isinstance(record, dict) or record.get("kind") != PLAN_KIND:
        raise SettingsError(f"{grid.settings}: not a lottery grid plan (kind != {PLAN_KIND!r})")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise SettingsError(f"{grid.settings}: schema_version {record.get('schema_version')} "
                            f"is not {SCHEMA_VERSION}")
    tasks = record.get("tasks")
    if not isinstance(tasks, list):
        raise SettingsError(f"{grid.settings}: field tasks is missing or not a list")
    try:
        record["tasks"] = _checked_tasks(tasks, where=str(grid.settings))
    except (TaskError, ValueError) as err:
        raise SettingsError(f"{grid.settings}: {err}") from None
    return record


def load_tasks(grid_dir: str | os.PathLike) -> list[Task]:
    return load_plan(grid_dir)["tasks"]


def done_ids(grid: GridPaths) -> set[str]:
    """Task ids with a result file (hidden temporary files of atomic writes are not results)."""
    if not grid.results.is_dir():
        return set()
    return {p.name[:-5] for p in grid.results.iterdir()
            if p.name.endswith(".json") and not p.name.startswith(".")}


def pending_tasks(grid: GridPaths, tasks: list[Task] | None = None) -> list[Task]:
    """Tasks without a result, in plan order (longest first)."""
    tasks = load_tasks(grid.root) if tasks is None else tasks
    done = done_ids(grid)
    return [t for t in tasks if t.task_id not in done]
