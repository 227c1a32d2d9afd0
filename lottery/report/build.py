"""Reports of a lottery grid: results tables, report.md, and the progress of a running grid.

Reads only files (results/<task_id>.json, settings.json, claims/, the dense run's history.csv and
Early-Bird files), so it runs on any machine that sees the grid directory, while the grid is still
running too. Magnitude points (one-shot, IMP) and structured points (channels pruned, network
compacted, retrained) share results.csv/parquet; each kind has its own table in report.md.
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
from common.paths import EARLY_BIRD_CHECKPOINT, DenseRunPaths, GridPaths
from lottery.grid.claims import DEFAULT_STALE_AFTER, list_claims
from lottery.grid.plan import done_ids, load_plan

log = logging.getLogger(__name__)

# One row per point; the order of the columns in results.csv / results.parquet.
COLUMNS = ("task_id", "kind", "rewind", "control", "scope", "mask_id", "threshold_kind",
           "threshold_value", "target_sparsity", "sparsity", "remaining_fraction", "accuracy",
           "best_accuracy", "loss", "epochs_to_best", "epochs", "imp_rounds", "imp_rate", "seed",
           "wall_time", "host", "rank", "finished_at",
           # structured points: compacted network vs the dense one at the draw checkpoint
           "ratio", "criterion", "draw_epoch", "params", "params_dense", "flops", "flops_dense",
           "file_bytes", "file_bytes_dense", "images_per_s", "images_per_s_dense", "speedup",
           "inference_runtime", "inference_threads", "draw_accuracy", "accuracy_before")
STRUCTURED_COLUMNS = COLUMNS[COLUMNS.index("ratio"):]
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
        **_structured_fields(task, result),
    }


def _integer(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _structured_fields(task: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    if task.get("kind") != "structured":
        return dict.fromkeys(STRUCTURED_COLUMNS)
    return {
        "ratio": _number(task.get("ratio")), "criterion": task.get("criterion"),
        "draw_epoch": _number(result.get("draw_epoch", task.get("draw_epoch"))),
        **{k: _integer(result.get(k)) for k in ("params", "params_dense", "flops", "flops_dense",
                                                "file_bytes", "file_bytes_dense")},
        **{k: _number(result.get(k)) for k in ("images_per_s", "images_per_s_dense", "speedup",
                                               "draw_accuracy", "accuracy_before")},
        # Older results were timed in Keras with BatchNorm folded.
        "inference_runtime": result.get("inference_runtime") or (
            "keras" if result.get("images_per_s") is not None else None),
        "inference_threads": _integer(result.get("inference_threads")),
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
    """Rewind points of the magnitude points, in training order (the columns of their table)."""
    positions = (plan.get("run") or {}).get("positions") or {}
    seen = list(dict.fromkeys(r["rewind"] for r in rows
                              if r["rewind"] is not None and r["kind"] != "structured"))
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
             "seed": pa.int64(), "rank": pa.int64(), "params": pa.int64(), "params_dense": pa.int64(),
             "flops": pa.int64(), "flops_dense": pa.int64(), "file_bytes": pa.int64(),
             "file_bytes_dense": pa.int64(), "inference_threads": pa.int64()}
    strings = {"task_id", "kind", "rewind", "control", "scope", "mask_id", "threshold_kind", "host",
               "criterion", "inference_runtime"}
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


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _pair(small: int | None, dense: int | None) -> str:
    """'12,345 / 45,678 (27.0%)': compacted / dense and the fraction that remains."""
    text = f"{_count(small)} / {_count(dense)}"
    return text + (f" ({100.0 * small / dense:.1f}%)" if small is not None and dense else "")


def structured_table(rows: list[dict[str, Any]], positions: Mapping[str, float] | None = None) -> str:
    """Markdown: one row per structured point, by criterion, channel ratio, then draw epoch."""
    structured = [r for r in rows if r["kind"] == "structured"]
    if not structured:
        return ""
    positions = positions or {}

    def key(r):
        epoch = r["draw_epoch"] if r["draw_epoch"] is not None else positions.get(r["rewind"], math.inf)
        return (r["criterion"] or "", r["ratio"] or 0.0, epoch, r["task_id"])

    lines = ["| draw | ratio | criterion | params (compact / dense) | multiply-adds (compact / dense) "
             "| CPU images/s compact | CPU images/s dense | speed-up | accuracy at draw "
             "| accuracy compacted | accuracy retrained |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(structured, key=key):
        draw = r["rewind"] + (f" (epoch {r['draw_epoch']:g})" if r["rewind"] == EARLY_BIRD_CHECKPOINT
                              and r["draw_epoch"] is not None else "")
        rate = lambda v: "—" if v is None else f"{v:,.0f}"
        speed = "—" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {draw} | {_fmt_ratio(r['ratio'])} | {r['criterion']} | "
                     f"{_pair(r['params'], r['params_dense'])} | {_pair(r['flops'], r['flops_dense'])} | "
                     f"{rate(r['images_per_s'])} | {rate(r['images_per_s_dense'])} | {speed} | "
                     f"{_fmt(r['draw_accuracy'])} | {_fmt(r['accuracy_before'])} | {_fmt(r['accuracy'])} |")
    runtimes = sorted({r["inference_runtime"] for r in structured if r["inference_runtime"]})
    if runtimes:
        where = {"litert": "the LiteRT export (XNNPACK CPU kernels)",
                 "keras": "Keras with BatchNorm folded"}
        threads = sorted({r["inference_threads"] for r in structured if r["inference_threads"]})
        lines += ["", "Images/s: both networks timed on this CPU in "
                  + " / ".join(where.get(r, r) for r in runtimes)
                  + (f", {'/'.join(str(t) for t in threads)} thread(s)" if threads else "") + "."]
    return "\n".join(lines) + "\n"


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


# -- Early-Bird --------------------------------------------------------------------------------
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


def early_bird_masks(run: DenseRunPaths) -> tuple[list[int], list[Any]]:
    """The per-epoch BN channel masks of early_bird_masks.npz, in epoch order ([] if none)."""
    import zipfile

    from train.early_bird import read_masks

    if not run.early_bird_masks.is_file():
        return [], []
    try:
        masks = read_masks(run.early_bird_masks)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        log.warning("%s: skipped (%s)", run.early_bird_masks, err)
        return [], []
    epochs = sorted(masks)
    return epochs, [masks[e] for e in epochs]


def early_bird_summary(info: Mapping[str, Any]) -> str:
    drawn = info.get("drawn_epoch")
    ran = len(info.get("epochs") or [])
    settings = ", ".join(f"{k} {info[k]}" for k in ("ratio", "window", "threshold") if k in info)
    if drawn is None:
        return f"No Early-Bird ticket was drawn in the {ran} epochs of the dense run ({settings}).\n"
    stopped = (f" Dense training stopped there: {ran} of {info['epochs_planned']} planned epochs run."
               if info.get("stopped_early") and info.get("epochs_planned") else "")
    return (f"Early-Bird ticket drawn at epoch {drawn} of {ran} epochs run ({settings}); the dense "
            f"run's checkpoint `{info.get('checkpoint')}` holds it.{stopped}\n")


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
    from lottery.report import plots

    grid = GridPaths(Path(grid_dir))
    plan = load_plan(grid.root)
    records = read_records(grid)
    rows = [result_row(r) for r in records]
    rewinds = rewind_order(plan, rows)
    dense = dense_accuracy(grid)
    positions = (plan.get("run") or {}).get("positions") or {}
    write_tables(grid, rows)
    run = DenseRunPaths(grid.root.parent)
    eb_info = early_bird_info(run)
    eb_epochs, eb_masks = early_bird_masks(run) if eb_info is not None else ([], [])
    written_plots = plots.write_plots(grid, records, rows, rewinds, dense)
    if len(eb_masks) >= 2:
        from train.early_bird import distance_matrix

        written_plots.append(plots.early_bird_heatmap(
            grid.plots / "early_bird_distances.png", eb_epochs, distance_matrix(eb_masks),
            eb_info.get("drawn_epoch")))
    kinds = {t.get("kind", "oneshot") for t in plan["tasks"]}
    table = accuracy_table(rows, rewinds) if kinds != {"structured"} else ""
    structured = structured_table(rows, positions)
    total = len(plan["tasks"])
    parts = [f"# Lottery grid {grid.root.name}", "",
             f"Dense run: `{grid.root.parent.name}`; dense accuracy: {_fmt(dense)}; "
             f"points finished: {len(rows)}/{total}.", ""]
    if table:
        parts += ["## Accuracy after retraining (one-shot masks)", "",
                  "Rows: real sparsity of the mask; columns: rewind point; cells: accuracy, then the "
                  "controls (reinit = same mask, random init; rand-mask = random mask of the same "
                  "per-layer sparsity).", "", table]
    imp = imp_table(records)
    if imp:
        parts += ["## Iterative magnitude pruning", "", imp]
    if structured or "structured" in kinds:
        parts += ["## Structured pruning (compacted networks)", "",
                  "Channels pruned at the ratio by the criterion, drawn at a checkpoint of the dense "
                  "run, the network physically compacted, then retrained with the dense run's "
                  "recipe. Parameters and multiply-adds (batch 1) of the compacted network vs the "
                  "dense one; images/s measured on this machine's CPU; speed-up = compact / dense "
                  "images/s. Accuracy at the draw checkpoint (dense), of the compacted network "
                  "before retraining, and after.", "",
                  structured or "_no structured points finished yet_\n"]
    if eb_info is not None:
        parts += ["## Early-Bird ticket", "", early_bird_summary(eb_info)]
    if written_plots:
        parts += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in written_plots] + [""]
    write_text(grid.report, "\n".join(parts))
    return {"grid": grid.root, "rows": len(rows), "total": total, "table": table, "imp_table": imp,
            "structured_table": structured, "early_bird": eb_info,
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
