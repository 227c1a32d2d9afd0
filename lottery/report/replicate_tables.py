"""report.md tables over replicates and retraining modes (lottery.report.stats does the maths).

  replicate_table   every point with its replicates: n, mean, sd, 95% CI of the accuracy
  paired_table      each one-shot ticket minus each of its controls, paired by replicate
  modes_table       weight rewinding vs learning-rate rewinding vs fine-tuning, per sparsity

A point is its task id without the replicate suffix (-rep<r>), so replicate 0 and its later
replicates group together whatever the kind of point.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from lottery.report.stats import NO_INTERVAL, fmt_interval, paired, summarize

_REPLICATE = re.compile(r"-rep\d+$")
MODE_ORDER = ("weights", "lr", "finetune")
MODE_NAMES = {"weights": "weight rewinding", "lr": "learning-rate rewinding", "finetune": "fine-tuning"}


def point_id(task_id: str) -> str:
    """oneshot-global-s9000-init-none-rep2 -> oneshot-global-s9000-init-none."""
    return _REPLICATE.sub("", task_id)


def _mode(row: dict[str, Any]) -> str:
    return row.get("retrain_mode") or "weights"


def _replicate(row: dict[str, Any]) -> int:
    return row.get("replicate") or 0


def max_replicates(rows: Iterable[dict[str, Any]]) -> int:
    """The most replicates any point has finished (1 for a grid without replicates)."""
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("accuracy") is not None:
            counts[point_id(r["task_id"])] = counts.get(point_id(r["task_id"]), 0) + 1
    return max(counts.values(), default=0)


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def replicate_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per point (all kinds), its replicates' accuracy statistics."""
    points: dict[str, list[dict]] = {}
    for r in rows:
        points.setdefault(point_id(r["task_id"]), []).append(r)
    lines = ["| point | sparsity | n | mean | sd | 95% CI |", "|---|---:|---:|---:|---:|---|"]
    for pid, found in points.items():
        s = summarize([r["accuracy"] for r in found])
        sparsity = summarize([r["sparsity"] for r in found]).mean
        lines.append(f"| {pid} | {_f(sparsity)} | {s.n} | {_f(s.mean)} | {_f(s.sd)} | {fmt_interval(s)} |")
    return "\n".join(lines) + "\n"


def _by_replicate(rows: Iterable[dict[str, Any]]) -> dict[int, float]:
    return {_replicate(r): r["accuracy"] for r in rows if r["accuracy"] is not None}


def _oneshot_groups(rows: list[dict[str, Any]]) -> dict[tuple, list[dict]]:
    """(threshold kind, value, mode, rewind, control) -> the rows of that point's replicates."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "oneshot":
            key = (r["threshold_kind"], r["threshold_value"], _mode(r), r["rewind"], r["control"])
            groups.setdefault(key, []).append(r)
    return groups


def _order(key: tuple) -> tuple:
    kind, value, mode, rewind, control = key
    return (value is None, value or 0.0, MODE_ORDER.index(mode) if mode in MODE_ORDER else 9,
            str(rewind), control)


def paired_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each ticket (control none) minus each of its controls (same mask threshold,
    retraining mode and rewind point), over the replicates both finished; '' without controls."""
    groups = _oneshot_groups(rows)
    lines = ["| sparsity | mode | rewind | control | pairs | ticket − control (mean) | 95% CI | verdict |",
             "|---:|---|---|---|---:|---:|---|---|"]
    found = False
    for key in sorted(groups, key=_order):
        kind, value, mode, rewind, control = key
        ticket = groups.get((kind, value, mode, rewind, "none"))
        if control == "none" or not ticket:
            continue
        found = True
        result = paired(_by_replicate(ticket), _by_replicate(groups[key]))
        sparsity = summarize([r["sparsity"] for r in ticket]).mean
        d = result.difference
        lines.append(f"| {_f(sparsity)} | {mode} | {rewind} | {control} | {d.n} | "
                     f"{'—' if d.mean is None else f'{d.mean:+.4f}'} | {fmt_interval(d)} | "
                     f"{result.verdict} |")
    return "\n".join(lines) + "\n" if found else ""


def mode_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(mode, rewind) of the one-shot tickets, weights first, each mode's rewinds in row order."""
    seen = dict.fromkeys((_mode(r), r["rewind"]) for r in rows
                         if r["kind"] == "oneshot" and r["control"] == "none")
    return sorted(seen, key=lambda k: MODE_ORDER.index(k[0]) if k[0] in MODE_ORDER else 9)


def modes_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: rows = sparsity, columns = (retraining mode, rewind) of the tickets, cells = mean
    accuracy (± 95% CI half-width with replicates); the last column is the masked final weights
    before any retraining (where lr and finetune start). '' with only one mode."""
    columns = mode_columns(rows)
    if len({m for m, _ in columns}) < 2:
        return ""
    groups = _oneshot_groups(rows)
    thresholds = sorted({(k[0], k[1]) for k in groups}, key=lambda t: (t[1] is None, t[1] or 0.0))
    head = [f"{mode}" + ("" if mode == "finetune" else f", rewind {rewind}") for mode, rewind in columns]
    lines = ["| sparsity | " + " | ".join(head) + " | masked final weights, not retrained |",
             "|---:|" + "---:|" * (len(columns) + 1)]
    for kind, value in thresholds:
        cells, sparsities, before = [], [], []
        for mode, rewind in columns:
            found = groups.get((kind, value, mode, rewind, "none")) or []
            sparsities += [r["sparsity"] for r in found]
            before += [r["pruned_accuracy"] for r in found if r.get("pruned_accuracy") is not None]
            s = summarize([r["accuracy"] for r in found])
            cells.append(_f(s.mean) + (f" ± {s.half_width:.4f}" if s.half_width is not None else ""))
        # pruned_accuracy does not depend on the mode or replicate: the same masked final model
        pre = summarize(before).mean
        lines.append(f"| {_f(summarize(sparsities).mean)} | " + " | ".join(cells) + f" | {_f(pre)} |")
    return "\n".join(lines) + "\n"


def replicate_note(n: int) -> str:
    """The report.md sentence on how many replicates the statistics rest on."""
    if n < 2:
        return f"One replicate per point ({NO_INTERVAL}): add replicates with `--replicates N`."
    return (f"Up to {n} replicates per point. Mean, sample standard deviation and a 95% confidence "
            f"interval (Student t, n - 1 degrees of freedom) over the replicates; ticket vs control "
            f"differences are paired by replicate (same data order). Verdict: better / worse when "
            f"the interval of the difference excludes 0, else no detectable difference.")
