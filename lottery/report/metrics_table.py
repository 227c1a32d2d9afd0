"""report.md's "Top-1 and top-5 accuracy" section, BatchNorm recalibration and chance warnings.

Top-5 (train.metrics) is shown for datasets of more than 5 classes ("n/a" otherwise: every label
is among the top 5). With at least HEADLINE_TOP5_CLASSES classes (ImageNet's 1000) the section
is titled as the headline and placed right after the validation note, before the top-1 table.
Rows: one per mask (kind, control, rewind, target sparsity) over replicates and retraining modes
"weights" (the means when there are several replicates).
"""
from __future__ import annotations

import csv
from collections import defaultdict
from typing import Any, Mapping

from common.atomic import read_json
from common.paths import DenseRunPaths
from train.metrics import HEADLINE_TOP5_CLASSES, has_top5


def num_classes(grid_root) -> int | None:
    path = DenseRunPaths(grid_root.parent).settings
    try:
        value = read_json(path).get("num_classes")
    except (OSError, ValueError):
        return None
    return int(value) if value is not None else None


def dense_top5(grid_root) -> float | None:
    path = DenseRunPaths(grid_root.parent).history
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    value = rows[-1].get("val_top5_accuracy") if rows else None
    return float(value) if value not in (None, "") else None


def _fmt(value: float | None, applicable: bool = True) -> str:
    if not applicable:
        return "n/a"
    return "—" if value is None else f"{value:.4f}"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def metrics_table(rows: list[Mapping[str, Any]], classes: int | None) -> str:
    top5 = has_top5(classes)
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if (r.get("retrain_mode") or "weights") != "weights":
            continue
        groups[(r.get("kind") or "", r.get("control") or "none", r.get("rewind") or "",
                r.get("target_sparsity"), r.get("ratio"))].append(r)
    lines = ["| kind | control | rewind | sparsity | top-1 | top-5 | best top-5 | BN recalibrated "
             "(top-1 before) | at chance |", "|---|---|---|---:|---:|---:|---:|---|---|"]
    for key in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        found = groups[key]
        kind, control, rewind, target, ratio = key
        recal = [r for r in found if r.get("bn_recalibrated")]
        recal_text = (f"yes ({_fmt(_mean([r.get('accuracy_before_bn_recalibration') for r in recal]))})"
                      if recal else ("no" if any(r.get("bn_recalibrated") is not None for r in found)
                                     else "—"))
        chance = sum(1 for r in found if r.get("val_at_chance"))
        sparsity = r0 if (r0 := _mean([r.get("sparsity") for r in found])) is not None else target
        lines.append(" | ".join([
            f"| {kind}", control, rewind, _fmt(sparsity) if ratio is None else f"ratio {ratio:g}",
            _fmt(_mean([r.get("accuracy") for r in found])),
            _fmt(_mean([r.get("top5_accuracy") for r in found]), top5),
            _fmt(_mean([r.get("best_top5_accuracy") for r in found]), top5),
            recal_text, f"**{chance}/{len(found)}**" if chance else "no"]) + " |")
    return "\n".join(lines) + "\n"


def metrics_section(grid, rows: list[Mapping[str, Any]]) -> list[str]:
    """The section's lines, and whether it leads the report (>= 100 classes)."""
    if not rows:
        return []
    classes = num_classes(grid.root)
    headline = classes is not None and classes >= HEADLINE_TOP5_CLASSES
    title = ("## Top-5 accuracy (headline: {} classes) and top-1".format(classes) if headline
             else "## Top-1 and top-5 accuracy")
    note = ("Validation accuracy after retraining: top-1 and top-5 (the label among the five most "
            "probable classes; n/a with 5 classes or fewer), the dense run's top-5 "
            f"{_fmt(dense_top5(grid.root), has_top5(classes))}. BN recalibrated: the point's "
            "BatchNorm statistics were recomputed from training batches after retraining, with "
            "its top-1 before in brackets. At chance: points whose validation accuracy sat at "
            "chance while training accuracy was well above it (see the result's chance_warning).")
    return [title, "", note, "", metrics_table(rows, classes)]


def leads_report(grid) -> bool:
    classes = num_classes(grid.root)
    return classes is not None and classes >= HEADLINE_TOP5_CLASSES
