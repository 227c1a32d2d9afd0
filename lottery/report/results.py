"""Reading a grid's results: the result files, one row per point, and the dense run's figures.

Reads only files (results/<task_id>.json, settings.json, the dense run's history.csv and Early-Bird
files), so it runs on any machine that sees the grid directory, while the grid is still running
too. A result file that is not a result record (not JSON, not an object, fields of the wrong kind)
is skipped with a warning that names it: one damaged file must not hide the others.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common.atomic import read_json
from common.paths import DenseRunPaths, GridPaths
from lottery.grid.plan import done_ids, load_plan
from lottery.points.recipe import history_rows
from train.early_bird import read_masks

log = logging.getLogger(__name__)

# One row per point; the order of the columns in results.csv / results.parquet.
COLUMNS = ("task_id", "kind", "rewind", "control", "scope", "mask_id", "threshold_kind",
           "threshold_value", "target_sparsity", "sparsity", "remaining_fraction", "accuracy",
           "best_accuracy", "loss", "epochs_to_best", "epochs", "imp_rounds", "imp_rate", "seed",
           # replicates and retraining modes (results before them: replicate 0, weights)
           "replicate", "retrain_mode", "pruned_accuracy",
           # top-5, BatchNorm recalibration, chance check (lottery.points.point_metrics); flags
           # are 1.0 / 0.0, empty for results written before them
           "top5_accuracy", "best_top5_accuracy", "bn_recalibrated",
           "accuracy_before_bn_recalibration", "val_at_chance",
           "wall_time", "host", "rank", "finished_at",
           # structured points: compacted network vs the dense one at the draw checkpoint
           "ratio", "criterion", "draw_epoch", "params", "params_dense", "flops", "flops_dense",
           "file_bytes", "file_bytes_dense", "images_per_s", "images_per_s_dense", "speedup",
           "inference_runtime", "inference_threads", "draw_accuracy", "accuracy_before")
STRUCTURED_COLUMNS = COLUMNS[COLUMNS.index("ratio"):]
MAX_RESULT_BYTES = 64 << 20  # a result file is ours, but a corrupt giant one must not sink a report


def number(value: Any) -> float | None:
    """A finite float, or None (missing, not a number, NaN or infinite)."""
    if isinstance(value, Mapping):  # a sparsity given as mask_sparsity()'s dict
        value = value.get("overall")
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def integer(value: Any) -> int | None:
    value = number(value)
    return None if value is None else int(value)


# -- result files --------------------------------------------------------------------------------
def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """One result record; ValueError (OSError when unreadable) saying why the file is not one."""
    path = Path(path)
    if path.stat().st_size > MAX_RESULT_BYTES:
        raise ValueError(f"larger than {MAX_RESULT_BYTES} bytes")
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"not a result record (JSON {type(record).__name__}, not an object)")
    if not isinstance(record.get("task"), dict):
        raise ValueError("not a result record (no task)")
    if not isinstance(record.get("task_id"), str):
        raise ValueError("not a result record (no task_id)")
    for field in ("result", "worker"):
        if not isinstance(record.get(field) or {}, dict):
            raise ValueError(f"field {field} is not an object")
    return record


def read_result_or_warn(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of `path`, or None after a warning naming the file and why it was skipped."""
    try:
        return read_result(path)
    except (OSError, ValueError) as err:
        log.warning("%s: skipped (%s)", path, err)
        return None


def read_records(grid: GridPaths) -> list[dict[str, Any]]:
    """Every result record of the grid, in plan order; unreadable files are named and skipped."""
    order = {t.task_id: i for i, t in enumerate(load_plan(grid.root)["tasks"])}
    records = []
    for task_id in sorted(done_ids(grid), key=lambda t: (order.get(t, len(order)), t)):
        record = read_result_or_warn(grid.result(task_id))
        if record is not None:
            records.append(record)
    return records


def result_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The results.csv / results.parquet row of one record (every column of COLUMNS)."""
    task, result = record["task"], record.get("result") or {}
    threshold = task.get("threshold") or {}
    sparsity = number(result.get("sparsity"))
    if sparsity is None:
        sparsity = number(task.get("sparsity"))
    worker = record.get("worker") or {}
    return {
        "task_id": record["task_id"], "kind": task.get("kind"), "rewind": task.get("rewind"),
        "control": task.get("control"), "scope": task.get("scope"), "mask_id": task.get("mask_id"),
        "threshold_kind": threshold.get("kind"), "threshold_value": number(threshold.get("value")),
        "target_sparsity": number(task.get("sparsity")), "sparsity": sparsity,
        "remaining_fraction": None if sparsity is None else 1.0 - sparsity,
        "accuracy": number(result.get("accuracy")), "best_accuracy": number(result.get("best_accuracy")),
        "loss": number(result.get("loss")), "epochs_to_best": result.get("epochs_to_best"),
        "epochs": task.get("epochs"), "imp_rounds": task.get("imp_rounds"),
        "imp_rate": number(task.get("imp_rate")), "seed": task.get("seed"),
        "replicate": integer(task.get("replicate", 0)),
        "retrain_mode": task.get("retrain_mode") or "weights",
        "pruned_accuracy": number(result.get("pruned_accuracy")),
        **{k: number(result.get(k)) for k in ("top5_accuracy", "best_top5_accuracy",
                                              "accuracy_before_bn_recalibration")},
        **{k: None if result.get(k) is None else float(bool(result.get(k)))
           for k in ("bn_recalibrated", "val_at_chance")},
        "wall_time": number(record.get("wall_time")), "host": worker.get("host"),
        "rank": worker.get("rank"), "finished_at": number(record.get("finished_at")),
        **_structured_fields(task, result),
    }


def _structured_fields(task: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    if task.get("kind") != "structured":
        return dict.fromkeys(STRUCTURED_COLUMNS)
    return {
        "ratio": number(task.get("ratio")), "criterion": task.get("criterion"),
        "draw_epoch": number(result.get("draw_epoch", task.get("draw_epoch"))),
        **{k: integer(result.get(k)) for k in ("params", "params_dense", "flops", "flops_dense",
                                               "file_bytes", "file_bytes_dense")},
        **{k: number(result.get(k)) for k in ("images_per_s", "images_per_s_dense", "speedup",
                                              "draw_accuracy", "accuracy_before")},
        # Older results were timed in Keras with BatchNorm folded.
        "inference_runtime": result.get("inference_runtime") or (
            "keras" if result.get("images_per_s") is not None else None),
        "inference_threads": integer(result.get("inference_threads")),
    }


def point_history(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A point's per-epoch history as rows, stored either as [{epoch, ...}] or as {metric: [...]}."""
    history = result.get("history")
    if isinstance(history, list):
        return [dict(r) for r in history if isinstance(r, Mapping)]
    if isinstance(history, Mapping):
        return history_rows({k: v for k, v in history.items() if isinstance(v, list)})
    return []


# -- the dense run ---------------------------------------------------------------------------------
def validation_size(grid: GridPaths) -> int | None:
    """Images in the validation split the points are judged on (the dense run's settings.json
    records the dataset's split sizes); None when the run's settings.json does not say."""
    path = DenseRunPaths(grid.root.parent).settings
    if not path.is_file():
        return None
    try:
        record = read_json(path)
        size = record["dataset"]["records"]["validation"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: no validation size (%s); report.md leaves it out", path, err)
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def dense_accuracy(grid: GridPaths) -> float | None:
    """The dense run's final validation accuracy (last row of its history.csv)."""
    path = DenseRunPaths(grid.root.parent).history
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for key in ("val_accuracy", "val_acc", "validation_accuracy"):
        if rows and key in rows[-1]:
            return number(rows[-1][key])
    log.warning("%s: no val_accuracy column; the dense line is left out", path)
    return None


def early_bird_info(run: DenseRunPaths) -> dict[str, Any] | None:
    """The dense run's early_bird.json, or None when the run has none (or it is unreadable)."""
    if not run.early_bird.is_file():
        return None
    try:
        record = read_json(run.early_bird)
        if not isinstance(record, dict) or not isinstance(record.get("epochs"), list):
            raise ValueError("field epochs is missing")
    except (OSError, ValueError) as err:
        log.warning("%s: skipped (%s)", run.early_bird, err)
        return None
    return record


def early_bird_masks(run: DenseRunPaths) -> tuple[list[int], list[np.ndarray]]:
    """The per-epoch BN channel masks of early_bird_masks.npz, in epoch order ([] if none)."""
    if not run.early_bird_masks.is_file():
        return [], []
    try:
        masks = read_masks(run.early_bird_masks)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        log.warning("%s: skipped (%s)", run.early_bird_masks, err)
        return [], []
    epochs = sorted(masks)
    return epochs, [masks[e] for e in epochs]


# -- everything a report is made of ------------------------------------------------------------------
def rewind_order(plan: Mapping[str, Any], rows: list[dict]) -> list[str]:
    """Rewind points of the magnitude points, in training order (the columns of their table)."""
    positions = (plan.get("run") or {}).get("positions") or {}
    seen = list(dict.fromkeys(r["rewind"] for r in rows  # finetune's "final" is no rewind point
                              if r["rewind"] is not None and r["kind"] != "structured"
                              and r.get("retrain_mode") != "finetune"))
    return sorted(seen, key=lambda r: (positions.get(r, math.inf), seen.index(r)))


def planned_sparsities(plan: Mapping[str, Any]) -> list[float]:
    """The one-shot sparsities the grid was planned with (`--sparsities`; for quantile grids the
    planned masks' real sparsities), ascending."""
    given = (plan.get("settings") or {}).get("sparsities")
    if given:
        return sorted(float(v) for v in given)
    return sorted({round(float(t.sparsity), 6) for t in plan["tasks"]
                   if t.kind == "oneshot" and t.control == "none" and t.sparsity is not None})


def planned_imp_sparsities(plan: Mapping[str, Any]) -> list[float]:
    """The sparsity after every planned IMP round, 1 - (1 - rate)^r, ascending."""
    return sorted({round(1.0 - (1.0 - t.imp_rate) ** r, 6) for t in plan["tasks"]
                   if t.kind == "imp" and 0.0 < t.imp_rate < 1.0 for r in range(1, t.imp_rounds + 1)})


@dataclasses.dataclass(frozen=True)
class ReportData:
    """What report.md, the tables and the plots are drawn from, read from files only."""

    grid: GridPaths
    plan: dict[str, Any]
    records: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    rewinds: list[str]                     # magnitude points' rewind points, training order
    dense: float | None                    # the dense run's final validation accuracy
    validation_size: int | None            # images in the validation split
    early_bird: dict[str, Any] | None      # the dense run's early_bird.json
    early_bird_epochs: list[int]
    early_bird_masks: list[np.ndarray]


def read_report_data(grid_dir: str | os.PathLike) -> ReportData:
    grid = GridPaths(Path(grid_dir))
    plan = load_plan(grid.root)
    records = read_records(grid)
    rows = [result_row(r) for r in records]
    run = DenseRunPaths(grid.root.parent)
    eb_info = early_bird_info(run)
    eb_epochs, eb_masks = early_bird_masks(run) if eb_info is not None else ([], [])
    return ReportData(grid, plan, records, rows, rewind_order(plan, rows), dense_accuracy(grid),
                      validation_size(grid), eb_info, eb_epochs, eb_masks)
