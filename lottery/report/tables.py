"""The tables of a grid report: results.csv / results.parquet, and the Markdown tables of report.md.

Magnitude points (one-shot, IMP) and structured points (channels pruned, network compacted,
retrained) share results.csv/parquet; each kind has its own table in report.md.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_output, write_text
from common.paths import EARLY_BIRD_CHECKPOINT, GridPaths
from lottery.report.results import COLUMNS, number
from lottery.report.stats import summarize

CONTROL_SHORT = {"random_reinit": "reinit", "random_mask": "rand-mask"}
_INTEGER_COLUMNS = {"epochs_to_best", "epochs", "imp_rounds", "seed", "replicate", "rank", "params",
                    "params_dense", "flops", "flops_dense", "file_bytes", "file_bytes_dense", "inference_threads"}
_STRING_COLUMNS = {"task_id", "kind", "rewind", "control", "scope", "mask_id", "threshold_kind", "host",
                   "retrain_mode", "criterion", "inference_runtime"}


# -- results.csv / results.parquet -------------------------------------------------------------------
def write_tables(grid: GridPaths, rows: list[dict[str, Any]]) -> None:
    """results.parquet and results.csv, one row per finished point (atomic writes)."""
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


def _schema() -> pa.Schema:
    def kind(column: str) -> pa.DataType:
        if column in _STRING_COLUMNS:
            return pa.string()
        return pa.int64() if column in _INTEGER_COLUMNS else pa.float64()

    return pa.schema([(c, kind(c)) for c in COLUMNS])


# -- Markdown ------------------------------------------------------------------------------------------
def fmt_accuracy(value: float | None) -> str:
    """An accuracy or sparsity as report.md prints it (4 decimals, an em dash when unknown)."""
    return "—" if value is None else f"{value:.4f}"


def accuracy_table(rows: list[dict[str, Any]], rewinds: list[str]) -> str:
    """Markdown: rows = sparsity (one-shot masks), columns = rewind point, cells = accuracy with
    the controls' accuracies after it."""
    # Weight rewinding only (other retraining modes have their own table); replicates averaged.
    oneshot = [r for r in rows if r["kind"] == "oneshot" and (r.get("retrain_mode") or "weights") == "weights"]
    if not oneshot:
        return "_no one-shot points finished yet_\n"
    groups: dict[tuple, dict[tuple[str, str], list[dict]]] = {}
    for r in oneshot:
        # The magnitude mask a row belongs to: its threshold (random masks copy its sparsity).
        key = (r["threshold_kind"], r["threshold_value"])
        groups.setdefault(key, {}).setdefault((r["rewind"], r["control"]), []).append(r)
    by_mask = {key: {cell: _replicate_mean(found) for cell, found in cells.items()}
               for key, cells in groups.items()}
    lines = ["| sparsity | " + " | ".join(f"rewind {w}" for w in rewinds) + " |",
             "|---:|" + "---:|" * len(rewinds)]
    for key in sorted(by_mask, key=lambda k: (k[1] is None, k[1] or 0.0)):
        cells = by_mask[key]
        none_rows = [r for (w, c), r in cells.items() if c == "none"]
        real = none_rows[0]["sparsity"] if none_rows else next(iter(cells.values()))["sparsity"]
        label = f"{fmt_accuracy(real)}" if key[0] != "quantile" else f"{fmt_accuracy(real)} (q {key[1]:.4g})"
        out = []
        for w in rewinds:
            main = cells.get((w, "none"))
            text = (fmt_accuracy(main["accuracy"]) + main["interval"]) if main else "—"
            extras = [f"{CONTROL_SHORT[c]} {fmt_accuracy(cells[(w, c)]['accuracy'])}"
                      for c in CONTROL_SHORT if (w, c) in cells]
            out.append(text + (" (" + ", ".join(extras) + ")" if extras else ""))
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _replicate_mean(found: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell of accuracy_table from its replicates: the row itself for one replicate (the
    table as before replicates existed), else the mean accuracy and ' ± ' the 95% CI half-width."""
    if len(found) == 1:
        return {**found[0], "interval": ""}
    summary = summarize([r["accuracy"] for r in found])
    half = summary.half_width
    return {**found[0], "accuracy": summary.mean,
            "interval": f" ± {half:.4f} (n={summary.n})" if half is not None else f" (n={summary.n})"}


def imp_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per round of every IMP chain."""
    chains = [r for r in records if r["task"].get("kind") == "imp"]
    if not chains:
        return ""
    lines = ["| chain | rewind | round | sparsity | accuracy |", "|---|---|---:|---:|---:|"]
    for rec in chains:
        for rnd in (rec.get("result") or {}).get("rounds") or []:
            lines.append(f"| {rec['task_id']} | {rec['task'].get('rewind')} | {rnd.get('round')} | "
                         f"{fmt_accuracy(number(rnd.get('sparsity')))} | {fmt_accuracy(number(rnd.get('accuracy')))} |")
    return "\n".join(lines) + "\n"


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _pair(small: int | None, dense: int | None) -> str:
    """'12,345 / 45,678 (27.0%)': compacted / dense and the fraction that remains."""
    text = f"{_count(small)} / {_count(dense)}"
    return text + (f" ({100.0 * small / dense:.1f}%)" if small is not None and dense else "")


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


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
        speed = "—" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {draw} | {_fmt_ratio(r['ratio'])} | {r['criterion']} | "
                     f"{_pair(r['params'], r['params_dense'])} | {_pair(r['flops'], r['flops_dense'])} | "
                     f"{_rate(r['images_per_s'])} | {_rate(r['images_per_s_dense'])} | {speed} | "
                     + " | ".join(fmt_accuracy(r[c]) for c in ("draw_accuracy", "accuracy_before", "accuracy"))
                     + " |")
    runtimes = sorted({r["inference_runtime"] for r in structured if r["inference_runtime"]})
    if runtimes:
        where = {"litert": "the LiteRT export (XNNPACK CPU kernels)",
                 "keras": "Keras with BatchNorm folded"}
        threads = sorted({r["inference_threads"] for r in structured if r["inference_threads"]})
        lines += ["", "Images/s: both networks timed on this CPU in "
                  + " / ".join(where.get(r, r) for r in runtimes)
                  + (f", {'/'.join(str(t) for t in threads)} thread(s)" if threads else "") + "."]
    return "\n".join(lines) + "\n"


def early_bird_summary(info: Mapping[str, Any]) -> str:
    """The report.md paragraph on the dense run's Early-Bird ticket."""
    drawn = info.get("drawn_epoch")
    ran = len(info.get("epochs") or [])
    settings = ", ".join(f"{k} {info[k]}" for k in ("ratio", "window", "threshold") if k in info)
    if drawn is None:
        return f"No Early-Bird ticket was drawn in the {ran} epochs of the dense run ({settings}).\n"
    stopped = (f" Dense training stopped there: {ran} of {info['epochs_planned']} planned epochs run."
               if info.get("stopped_early") and info.get("epochs_planned") else "")
    return (f"Early-Bird ticket drawn at epoch {drawn} of {ran} epochs run ({settings}); the dense "
            f"run's checkpoint `{info.get('checkpoint')}` holds it.{stopped}\n")


def validation_note(size: int | None) -> str:
    """The report.md line on the validation set: its size and so the resolution of an accuracy."""
    if not size:
        return ("Validation set: size unknown (the dense run's settings.json does not record it), "
                "so the resolution of an accuracy is unknown.")
    return (f"Validation set: {size:,} images: every accuracy is a multiple of 1/{size:,} = "
            f"{1.0 / size:.4g} ({100.0 / size:.3g} percentage points per image).")
