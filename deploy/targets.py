"""What `bigticket quantize` quantises: the model a dense run, a grid point or a grid stands for.

A target knows where its model comes from (a dense run's checkpoint rebuilt from the run's
settings, or a point's saved network `models/<task_id>.keras`, loaded with safe_mode: the
compacted network of a structured point, the masked network of the others), the dataset it is
evaluated on (the dense run's, checked against the manifest sha256 the run recorded) and where its
exports go (common.paths.QuantizedPaths). Nothing is loaded until asked: a finished target is
skipped without building a model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

from common.atomic import read_json
from common.paths import DenseRunPaths, GridPaths, QuantizedPaths
from lottery.points.point_weights import load_point_model, point_model_path
from train.checkpoints import list_checkpoints, load_checkpoint

log = logging.getLogger(__name__)


class TargetError(ValueError):
    """A target that cannot be quantised; the message names the flag and the file."""


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str                       # "run" | "point"
    name: str                       # for logs: the run's label or the point's task id
    paths: QuantizedPaths
    run: DenseRunPaths              # the dense run (architecture, dataset)
    source: Path                    # the file the weights come from
    load: Callable[[], Any]         # -> an uncompiled Keras model
    describe: dict[str, Any]        # JSON-able, recorded in results.json

    def source_digest(self) -> str:
        """sha256 of the weights file: a retrained point or run invalidates earlier exports."""
        h = hashlib.sha256()
        with open(self.source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def dataset(self, data: str | os.PathLike | None = None):
        """(DatasetInfo, input_size, format) of the dense run; `data` overrides the recorded
        location (the dataset moved), and must hold the same manifest."""
        from train.data import open_dataset

        record = read_json(self.run.settings)
        settings = record["settings"]
        root = data or settings["data"]
        try:
            info = open_dataset(root)
        except (OSError, ValueError) as err:
            flag = "--data" if data else f"the dataset recorded in {self.run.settings} (give --data)"
            raise TargetError(f"{flag}: {err}") from None
        if info.manifest_sha256 != record.get("manifest_sha256"):
            raise TargetError(f"--data: the dataset at {root} is not the one run {self.run.root.name} "
                              f"was trained on (manifest sha256 differs)")
        return info, int(settings["input_size"]), settings.get("format")


def _open_run(run_dir: str | os.PathLike, flag: str) -> DenseRunPaths:
    run = DenseRunPaths(Path(run_dir))
    if not run.settings.is_file():
        raise TargetError(f"{flag} {run.root}: not a dense run directory (no settings.json)")
    return run


def run_target(run_dir: str | os.PathLike, label: str = "final") -> Target:
    """The dense run's checkpoint `label` (final: the trained network)."""
    run = _open_run(run_dir, "--run")
    available = list_checkpoints(run)
    if label not in available:
        raise TargetError(f"--label: run {run.root.name} has no checkpoint {label!r} "
                          f"(has: {', '.join(available) or 'none'})")
    return Target(kind="run", name=label, paths=QuantizedPaths.for_run(run, label), run=run,
                  source=run.checkpoint(label), load=lambda: load_checkpoint(run.root, label),
                  describe={"kind": "run", "run": str(run.root), "label": label})


def _open_grid(grid_dir: str | os.PathLike) -> GridPaths:
    grid = GridPaths(Path(grid_dir))
    if not grid.settings.is_file():
        raise TargetError(f"--grid {grid.root}: not a planned lottery grid (no settings.json)")
    return grid


def point_target(grid_dir: str | os.PathLike, task_id: str) -> Target:
    """A finished grid point's network (models/<task_id>.keras)."""
    grid = _open_grid(grid_dir)
    result_file = grid.result(task_id)
    if not result_file.is_file():
        raise TargetError(f"--point: {task_id!r} has no result in {grid.results} (not a finished "
                          f"point of this grid)")
    record = read_json(result_file)
    result = record.get("result") or {}
    model_file = point_model_path(grid.root, task_id)
    if not model_file.is_file():
        raise TargetError(f"--point {task_id}: {model_file} is missing: the point finished before "
                          f"points kept their trained network; delete {result_file} and run the "
                          f"grid again to retrain it")
    run = _open_run(grid.root.parent, "--grid (its dense run)")
    return Target(kind="point", name=task_id, paths=QuantizedPaths.for_point(grid, task_id), run=run,
                  source=model_file, load=lambda: load_point_model(grid.root, task_id),
                  describe={"kind": "point", "grid": str(grid.root), "task_id": task_id,
                            "point_kind": result.get("kind") or (record.get("task") or {}).get("kind"),
                            "sparsity": result.get("sparsity"),
                            "keras_accuracy": result.get("accuracy")})


def grid_targets(grid_dir: str | os.PathLike) -> tuple[list[Target], list[str]]:
    """Every finished point of the grid that kept its network; and the ids of those that did not."""
    grid = _open_grid(grid_dir)
    targets, missing = [], []
    files = sorted(p for p in grid.results.glob("*.json") if not p.name.startswith(".")) \
        if grid.results.is_dir() else []
    for path in files:
        task_id = path.stem
        try:
            targets.append(point_target(grid.root, task_id))
        except TargetError as err:
            log.warning("%s", err)
            missing.append(task_id)
    return targets, missing
