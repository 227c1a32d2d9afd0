"""Reports of a lottery grid: results tables, report.md, and the progress of a running grid.

Reads only files (results/<task_id>.json, settings.json, claims/, the dense run's history.csv), so
it runs on any machine that sees the grid directory, while the grid is still running too.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from common.atomic import atomic_output, read_json, write_text
from common.paths import DenseRunPaths, GridPaths
from lottery.claims import DEFAULT_STALE_AFTER, list_claims
from lottery.grid import done_ids, load_plan

log = logging.getLogger(__name__)

# One row per point; the order of the columns in results.csv / results.parquet.
COLUMNS = ("task_id", "kind", "rewind", "control", "scope", "mask_id", "threshold_kind",
           "threshold_value", "target_sparsity", "sparsity", "remaining_fraction", "accuracy",
           "best_accuracy", "loss", "epochs_to_best", "epochs", "imp_rounds", "imp_rate", "seed",
           "wall_time", "host", "rank", "finished_at")
CONTROL_SHORT = {"random_reinit": "reinit", "random_mask": "rand-mask"}
MAX_RESULT_BYTES = 64 << 20  # a result file is ours, but a corrupt giant one must not sink a report


def _number(value: Any) -> float | None:
    if isinstance(value, Mapping):  # a sparsity given as mask_sparsity()'s dict
        value = value.get("overall")
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def read_records(grid: GridPaths) -> list[dict[str, Any]]:
    """Every result record of the grid, in plan order; unreadable files are named and skipped."""
    order = {t["task_id"]: i for i, t in enumerate(load_plan(grid.root)["tasks"])}
    records = []
    for task_id in sorted(done_ids(grid), key=lambda t: (order.get(t, len(order)), t)):
        path = grid.result(task_id)
        try:
            if path.stat().st_size > MAX_RESULT_BYTES:
                raise ValueError(f"larger than {MAX_RESULT_BYTES} bytes")
            record = read_json(path)
            if not isinstance(record, dict) or not isinstance(record.get("task"), dict):
                raise ValueError("not a result record (no task)")
        except (OSError, ValueError) as err:
            log.warning("%s: skipped (%s)", path, err)
            continue
        records.append(record)
    return records


def result_row(record: Mapping[str, Any]) -> dict[str, Any]:
    task, result = record["task"], record.get("result") or {}
    threshold = task.get("threshold") or {}
    sparsity = _number(result.get("sparsity"))
    if sparsity is None:
        sparsity = _number(task.get("sparsity"))
    worker = record.get("worker") or {}
    return {
        "task_id": record["task_id"], "kind": task.get("kind"), "rewind": task.get("rewind"),
        "control": task.get("control"), "scope": task.get("scope"), "mask_id": task.get("mask_id"),
        "threshold_kind": threshold.get("kind"), "threshold_value": _number(threshold.get("value")),
        "target_sparsity": _number(task.get("sparsity")), "sparsity": sparsity,
        "remaining_fraction": None if sparsity is None else 1.0 - sparsity,
        "accuracy": _number(result.get("accuracy")), "best_accuracy": _number(result.get("best_accuracy")),
        "loss": _number(result.get("loss")), "epochs_to_best": result.get("epochs_to_best"),
        "epochs": task.get("epochs"), "imp_rounds": task.get("imp_rounds"),
        "imp_rate": _number(task.get("imp_rate")), "seed": task.get("seed"),
        "wall_time": _number(record.get("wall_time")), "host": worker.get("host"),
        "rank": worker.get("rank"), "finished_at": _number(record.get("finished_at")),
    }


def history_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A point's per-epoch history as rows, from either [{epoch, ...}] or {metric: [...]}."""
    history = result.get("history")
    if isinstance(history, list):
        return [dict(r) for r in history if isinstance(r, Mapping)]
    if isinstance(history, Mapping):
        n = max((len(v) for v in history.values() if isinstance(v, list)), default=0)
        return [{"epoch": i + 1, **{k: v[i] for k, v in history.items()
                                    if isinstance(v, list) and i < len(v)}} for i in range(n)]
    return []


def dense_accuracy(grid: GridPaths) -> float | None:
    """The dense run's final validation accuracy (last row of its history.csv)."""
    path = DenseRunPaths(grid.root.parent).history
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for key in ("val_accuracy", "val_acc", "validation_accuracy"):
        if rows and key in rows[-1]:
            return _number(rows[-1][key])
    log.warning("%s: no val_accuracy column; the dense line is left out", path)
    return None


def rewind_order(plan: Mapping[str, Any], rows: list[dict]) -> list[str]:
    positions = (plan.get("run") or {}).get("positions") or {}
    seen = list(dict.fromkeys(r["rewind"] for r in rows if r["rewind"] is not None))
    return sorted(seen, key=lambda r: (positions.get(r, math.inf), seen.index(r)))


def write_tables(grid: GridPaths, rows: list[dict[str, Any]]) -> None:
    """results.parquet and results.csv, one row per finished point (atomic writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows],
                                 schema=_schema()) if rows else _schema().empty_table()
    with atomic_output(grid.results_parquet) as fh:
        pq.write_table(table, fh)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in COLUMNS})
    write_text(grid.results_csv, text.getvalue())


def _schema():
    import pyarrow as pa

    types = {"epochs_to_best": pa.int64(), "epochs": pa.int64(), "imp_rounds": pa.int64(),
             "seed": pa.int64(), "rank": pa.int64()}
    strings = {"task_id", "kind", "rewind", "control", "scope", "mask_id", "threshold_kind", "host"}
    return pa.schema([(c, pa.string() if c in strings else types.get(c, pa.float64())) for c in COLUMNS])


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def accuracy_table(rows: list[dict[str, Any]], rewinds: list[str]) -> str:
    """Markdown: rows = sparsity (one-shot masks), columns = rewind point, cells = accuracy with
    the controls' accuracies after it."""
    oneshot = [r for r in rows if r["kind"] == "oneshot"]
    if not oneshot:
        return "_no one-shot points finished yet_\n"
    by_mask: dict[tuple, dict[tuple[str, str], dict]] = {}
    for r in oneshot:
        # The magnitude mask a row belongs to: its threshold (random masks copy its sparsity).
        key = (r["threshold_kind"], r["threshold_value"])
        by_mask.setdefault(key, {})[(r["rewind"], r["control"])] = r
    lines = ["| sparsity | " + " | ".join(f"rewind {w}" for w in rewinds) + " |",
             "|---:|" + "---:|" * len(rewinds)]
    for key in sorted(by_mask, key=lambda k: (k[1] is None, k[1] or 0.0)):
        cells = by_mask[key]
        none_rows = [r for (w, c), r in cells.items() if c == "none"]
        real = none_rows[0]["sparsity"] if none_rows else next(iter(cells.values()))["sparsity"]
        label = f"{_fmt(real)}" if key[0] != "quantile" else f"{_fmt(real)} (q {key[1]:.4g})"
        out = []
        for w in rewinds:
            main = cells.get((w, "none"))
            text = _fmt(main["accuracy"]) if main else "—"
            extras = [f"{CONTROL_SHORT[c]} {_fmt(cells[(w, c)]['accuracy'])}"
                      for c in CONTROL_SHORT if (w, c) in cells]
            out.append(text + (" (" + ", ".join(extras) + ")" if extras else ""))
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def imp_table(records: list[dict[str, Any]]) -> str:
    chains = [r for r in records if r["task"].get("kind") == "imp"]
    if not chains:
        return ""
    lines = ["| chain | rewind | round | sparsity | accuracy |", "|---|---|---:|---:|---:|"]
    for rec in chains:
        for rnd in rec["result"].get("rounds") or []:
            lines.append(f"| {rec['task_id']} | {rec['task'].get('rewind')} | {rnd.get('round')} | "
                         f"{_fmt(_number(rnd.get('sparsity')))} | {_fmt(_number(rnd.get('accuracy')))} |")
    return "\n".join(lines) + "\n"


def build_report(grid_dir: str | os.PathLike) -> dict[str, Any]:
    """Write results.parquet, results.csv, plots/*.png and report.md; returns what was written."""
    from lottery import plots

    grid = GridPaths(Path(grid_dir))
    plan = load_plan(grid.root)
    records = read_records(grid)
    rows = [result_row(r) for r in records]
    rewinds = rewind_order(plan, rows)
    dense = dense_accuracy(grid)
    write_tables(grid, rows)
    written_plots = plots.write_plots(grid, records, rows, rewinds, dense)
    table = accuracy_table(rows, rewinds)
    total = len(plan["tasks"])
    parts = [f"# Lottery grid {grid.root.name}", "",
             f"Dense run: `{grid.root.parent.name}`; dense accuracy: {_fmt(dense)}; "
             f"points finished: {len(rows)}/{total}.", "",
             "## Accuracy after retraining (one-shot masks)", "",
             "Rows: real sparsity of the mask; columns: rewind point; cells: accuracy, then the "
             "controls (reinit = same mask, random init; rand-mask = random mask of the same "
             "per-layer sparsity).", "", table]
    imp = imp_table(records)
    if imp:
        parts += ["## Iterative magnitude pruning", "", imp]
    if written_plots:
        parts += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in written_plots] + [""]
    write_text(grid.report, "\n".join(parts))
    return {"grid": grid.root, "rows": len(rows), "total": total, "table": table, "imp_table": imp,
            "dense_accuracy": dense, "parquet": grid.results_parquet, "csv": grid.results_csv,
            "report": grid.report, "plots": written_plots}


# -- progress ----------------------------------------------------------------------------------
def grid_progress(grid_dir: str | os.PathLike, stale_after: float = DEFAULT_STALE_AFTER) -> dict:
    """Points done/total, running claims and an ETA, from the files alone."""
    grid = GridPaths(Path(grid_dir))
    tasks = load_plan(grid.root)["tasks"]
    cost = {t["task_id"]: float(t.get("cost") or 1.0) for t in tasks}
    done = done_ids(grid) & set(cost)
    claims = [c for c in list_claims(grid, stale_after) if c.task_id in cost and c.task_id not in done]
    running = [c for c in claims if not c.stale]
    seconds_per_cost = []
    for task_id in done:
        try:
            wall = _number(read_json(grid.result(task_id)).get("wall_time"))
        except (OSError, ValueError):
            continue
        if wall is not None:
            seconds_per_cost.append((wall, cost[task_id]))
    remaining_cost = sum(c for t, c in cost.items() if t not in done)
    eta = 0.0 if not remaining_cost else None
    if seconds_per_cost and remaining_cost:
        rate = sum(w for w, _ in seconds_per_cost) / max(sum(c for _, c in seconds_per_cost), 1e-9)
        eta = remaining_cost * rate / max(1, len(running))
    return {"grid": str(grid.root), "total": len(tasks), "done": len(done),
            "pending": len(tasks) - len(done),
            "running": [{"task_id": c.task_id, "owner": c.owner, "heartbeat_age_s": round(c.age, 1)}
                        for c in running],
            "stale_claims": [c.task_id for c in claims if c.stale],
            "eta_seconds": None if eta is None else round(eta, 1)}


def format_progress(p: Mapping[str, Any]) -> str:
    eta = p["eta_seconds"]
    eta_text = ("0s (complete)" if p["pending"] == 0 else
                "unknown (no point finished yet)" if eta is None else _duration(eta))
    lines = [f"grid {p['grid']}",
             f"points done: {p['done']}/{p['total']} ({p['pending']} pending)",
             f"running: {len(p['running'])} claim(s)",
             f"ETA: {eta_text}" + (f" with {max(1, len(p['running']))} worker(s)" if p["pending"] else "")]
    for r in p["running"]:
        lines.append(f"  {r['task_id']}  by {r['owner']}  (heartbeat {r['heartbeat_age_s']} s ago)")
    if p["stale_claims"]:
        lines.append(f"stale claims (dead workers, will be reclaimed): {', '.join(p['stale_claims'])}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
