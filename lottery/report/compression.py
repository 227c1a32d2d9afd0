"""The report's compression section: dense vs GMP vs lottery ticket vs GMP + int8, side by side.

Drawn from the files `bigticket quantize` writes (`<target>/quantized/results.json`,
common.paths.QuantizedPaths; read here as plain JSON: lottery never imports the deploy package)
for the grid's dense run and its points. One row each, every figure measured on the LiteRT export
(float32 unless the row says int8): top-1 accuracy through the interpreter on the validation split,
parameters and non-zero parameters of the network, file and gzip bytes, images/s on one CPU thread.

- dense: the dense run's final weights (when the dense run is itself a GMP run, its row is the GMP
  row instead);
- GMP: the grid's most sparse quantised point of kind "gmp";
- lottery ticket: a quantised one-shot or IMP point without control, the one nearest the GMP row's
  sparsity (the most sparse one when there is no GMP row), the more accurate on a tie;
- GMP + int8: the GMP row's full-integer int8 export (dynamic-range int8 when that is all there is).

A plot, accuracy_vs_gzip_bytes.png, shows every quantised variant of every target.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

from common.atomic import write_bytes
from common.paths import DenseRunPaths, GridPaths, QuantizedPaths

log = logging.getLogger(__name__)

PLOT = "accuracy_vs_gzip_bytes.png"
TICKET_KINDS = ("oneshot", "imp")
INT8 = ("full_int8", "dynamic_int8")
COLUMNS = ("row", "source", "variant", "accuracy", "params", "nonzeros", "bytes", "gzip_bytes",
           "images_per_s")


def read_quantized(path: Path) -> dict[str, Any] | None:
    """A results.json of `bigticket quantize`, or None (missing, unreadable: warned)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable quantisation results (%s); skipped", path, err)
        return None
    if (not isinstance(record, dict) or record.get("kind") != "quantized"
            or not isinstance(record.get("variants"), dict) or not record["variants"]
            or not isinstance(record.get("model"), dict)):
        log.warning("%s: not a results file of `bigticket quantize`; skipped", path)
        return None
    return record


def _is_gmp_run(run: DenseRunPaths) -> bool:
    try:
        settings = json.loads(run.settings.read_text(encoding="utf-8")).get("settings") or {}
    except (OSError, ValueError):
        return False
    return settings.get("gmp_schedule", "none") not in (None, "none")


def quantized_targets(grid: GridPaths, records: Iterable[Mapping[str, Any]]
                      ) -> list[dict[str, Any]]:
    """[{name, family, sparsity, record}] of the dense run and every point with exports."""
    out = []
    run = DenseRunPaths(grid.root.parent)
    dense = read_quantized(QuantizedPaths.for_run(run).results)
    if dense is not None:
        out.append({"name": run.root.name, "family": "gmp" if _is_gmp_run(run) else "dense",
                    "sparsity": dense["model"].get("sparsity"), "record": dense})
    for record in records:
        task_id = record.get("task_id")
        if not task_id:
            continue
        quantized = read_quantized(QuantizedPaths.for_point(grid, task_id).results)
        if quantized is None:
            continue
        task, result = record.get("task") or {}, record.get("result") or {}
        kind = result.get("kind") or task.get("kind")
        if kind in TICKET_KINDS:
            family = "ticket" if (task.get("control") or "none") == "none" else "control"
        else:
            family = kind or "other"
        out.append({"name": task_id, "family": family,
                    "sparsity": quantized["model"].get("sparsity"), "record": quantized})
    return out


def _row(label: str, target: Mapping[str, Any], variant: str) -> dict[str, Any]:
    record = target["record"]
    entry = record["variants"][variant]
    return {"row": label, "source": target["name"], "variant": variant,
            "accuracy": entry.get("accuracy"), "params": record["model"].get("params"),
            "nonzeros": record["model"].get("nonzeros"), "bytes": entry.get("bytes"),
            "gzip_bytes": entry.get("gzip_bytes"), "images_per_s": entry.get("images_per_s")}


def _float_variant(target: Mapping[str, Any]) -> str | None:
    variants = target["record"]["variants"]
    return "float32" if "float32" in variants else next(iter(variants), None)


def comparison_rows(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The section's rows (those the exports on disk allow), in the order dense, GMP, ticket,
    GMP + int8."""
    rows = []
    dense = next((t for t in targets if t["family"] == "dense"), None)
    gmps = sorted((t for t in targets if t["family"] == "gmp"), key=lambda t: -(t["sparsity"] or 0))
    gmp = gmps[0] if gmps else None
    tickets = [t for t in targets if t["family"] == "ticket"]
    if dense is not None and _float_variant(dense):
        rows.append(_row("dense", dense, _float_variant(dense)))
    if gmp is not None and _float_variant(gmp):
        rows.append(_row("GMP", gmp, _float_variant(gmp)))
    if tickets:
        goal = gmp["sparsity"] if gmp is not None else max(t["sparsity"] or 0 for t in tickets)

        def key(t):
            variant = _float_variant(t)
            accuracy = (t["record"]["variants"][variant].get("accuracy") or 0) if variant else 0
            return abs((t["sparsity"] or 0) - goal), -accuracy

        ticket = min(tickets, key=key)
        if _float_variant(ticket):
            rows.append(_row("lottery ticket", ticket, _float_variant(ticket)))
    if gmp is not None:
        variant = next((v for v in INT8 if v in gmp["record"]["variants"]), None)
        if variant:
            rows.append(_row("GMP + int8", gmp, variant))
    return rows


def _count(value) -> str:
    return "-" if value is None else f"{int(value):,}"


def comparison_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = ["| row | point / run | LiteRT variant | top-1 accuracy | parameters | non-zeros | "
             "file bytes | gzip bytes | images/s (1 thread) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        rate = "-" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}"
        lines.append(f"| {r['row']} | `{r['source']}` | {r['variant']} | {accuracy} | "
                     f"{_count(r['params'])} | {_count(r['nonzeros'])} | {_count(r['bytes'])} | "
                     f"{_count(r['gzip_bytes'])} | {rate} |")
    return "\n".join(lines) + "\n"


FAMILY_COLOURS = {"dense": "tab:gray", "gmp": "tab:blue", "ticket": "tab:orange",
                  "control": "tab:olive", "structured": "tab:green"}
VARIANT_MARKERS = {"float32": "o", "float16": "s", "dynamic_int8": "^", "full_int8": "D"}


def accuracy_vs_gzip(targets: list[dict[str, Any]]):
    """Every export of every target: accuracy vs gzip bytes (log scale); colour = family,
    marker = variant (hollow: sparse storage)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for t in targets:
        colour = FAMILY_COLOURS.get(t["family"], "tab:purple")
        for variant, entry in t["record"]["variants"].items():
            base = variant.removesuffix("_sparse")
            ax.scatter(entry["gzip_bytes"], entry["accuracy"], marker=VARIANT_MARKERS.get(base, "x"),
                       s=40, edgecolors=colour,
                       facecolors="none" if variant.endswith("_sparse") else colour)
    ax.set_xscale("log")
    ax.set_xlabel("gzip bytes of the LiteRT file (log scale)")
    ax.set_ylabel("top-1 accuracy (LiteRT, validation)")
    ax.set_title("Accuracy vs compressed size")
    ax.grid(alpha=0.3)
    families = sorted({t["family"] for t in targets})
    variants = sorted({v.removesuffix("_sparse") for t in targets for v in t["record"]["variants"]})
    handles = [Line2D([], [], color=FAMILY_COLOURS.get(f, "tab:purple"), marker="o", linestyle="",
                      label=f) for f in families]
    handles += [Line2D([], [], color="black", marker=VARIANT_MARKERS.get(v, "x"), linestyle="",
                       markerfacecolor="none", label=v) for v in variants]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    return fig


def compression_section(grid: GridPaths, records: Iterable[Mapping[str, Any]]
                        ) -> tuple[list[str], list[tuple[Path, str]], str]:
    """(report.md lines, [(plot path, caption)], the table) when exports exist; empty otherwise.
    `records`: the grid's result records (lottery.report.results.ReportData.records)."""
    targets = quantized_targets(grid, records)
    if not targets:
        return [], [], ""
    table = comparison_table(comparison_rows(targets))
    buf = io.BytesIO()
    accuracy_vs_gzip(targets).savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path = grid.plots / PLOT
    write_bytes(path, buf.getvalue())
    parts = ["## Compression: dense vs GMP vs lottery ticket vs GMP + int8", "",
             "Each network exported to LiteRT by `bigticket quantize` and measured there: top-1 "
             "accuracy through the interpreter on the validation split, parameters and non-zero "
             "parameters, file and gzip bytes, images/s on one CPU thread. Rows appear as their "
             "exports exist (the ticket is the one nearest the GMP point's sparsity).", "",
             table or "_no dense, GMP or ticket exports yet_\n"]
    caption = ("Accuracy vs gzip bytes of every LiteRT export (colour: dense, GMP, ticket, ...; "
               "marker: variant; hollow: sparse storage).")
    return parts, [(path, caption)], table
