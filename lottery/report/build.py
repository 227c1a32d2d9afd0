"""`bigticket report`: write a grid's results.parquet, results.csv, plots/*.png and report.md.

Reads only files (lottery.report.results), so it runs on any machine that sees the grid
directory, while the grid is still running too.
"""
from __future__ import annotations

import os
from typing import Any

from common.atomic import write_text
from lottery.report import plots
from lottery.report.compression import compression_section
from lottery.report.gmp_rows import GMP_NOTE, gmp_table
from lottery.report.metrics_table import leads_report, metrics_section
from lottery.report.replicate_tables import (
    max_replicates,
    modes_table,
    paired_table,
    replicate_note,
    replicate_table,
)
from lottery.report.results import read_report_data
from lottery.report.robustness import robustness_section
from lottery.report.tables import (
    accuracy_table,
    early_bird_summary,
    fmt_accuracy,
    imp_table,
    structured_table,
    validation_note,
    write_tables,
)


def replicate_sections(rows: list[dict[str, Any]]) -> list[str]:
    """report.md sections on replicates (only with more than one) and retraining modes (only
    with more than one mode)."""
    parts: list[str] = []
    n = max_replicates(rows)
    if n >= 2:
        parts += ["## Replicates: mean, standard deviation, 95% confidence interval", "",
                  replicate_note(n), "", replicate_table(rows)]
    pairs = paired_table(rows)
    if pairs and n >= 2:
        parts += ["## Tickets vs controls, paired over replicates", "",
                  "Difference of accuracy, ticket minus control, on the same replicates (same data "
                  "order); the verdict says whether the 95% interval excludes 0.", "", pairs]
    modes = modes_table(rows)
    if modes:
        parts += ["## Retraining modes on the same masks", "",
                  "weights: kept weights rewound to the rewind point (the lottery ticket); lr: the "
                  "dense run's final weights, masked, retrained with the learning-rate schedule "
                  "replayed from the rewind point; finetune: final weights, masked, retrained at a "
                  "constant small rate (Renda, Frankle & Carbin 2020). Cells: mean accuracy of the "
                  "mask's own points (± 95% CI half-width with replicates).", "", modes]
    return parts


def build_report(grid_dir: str | os.PathLike) -> dict[str, Any]:
    """Write results.parquet, results.csv, plots/*.png and report.md; returns what was written."""
    data = read_report_data(grid_dir)
    grid, plan, records, rows, dense = data.grid, data.plan, data.records, data.rows, data.dense
    positions = (plan.get("run") or {}).get("positions") or {}
    write_tables(grid, rows)
    written_plots = plots.write_plots(data)
    eb_info = data.early_bird
    kinds = {t.kind for t in plan["tasks"]}
    # Only the kinds the plan has get a section (an IMP-only grid has no one-shot table).
    table = accuracy_table(rows, data.rewinds) if kinds - {"structured", "imp"} else ""
    structured = structured_table(rows, positions)
    total = len(plan["tasks"])
    parts = [f"# Lottery grid {grid.root.name}", "",
             f"Dense run: `{grid.root.parent.name}`; dense accuracy: {fmt_accuracy(dense)}; "
             f"points finished: {len(rows)}/{total}.", "", validation_note(data.validation_size), ""]
    # Top-1/top-5, BN recalibration, chance flags: first for >= 100 classes (top-5 headline).
    metrics, lead = metrics_section(grid, rows), leads_report(grid)
    parts += metrics if lead else []
    if table:
        parts += ["## Accuracy after retraining (one-shot masks)", "",
                  "Rows: real sparsity of the mask; columns: rewind point; cells: accuracy, then the "
                  "controls (reinit = same mask, random init; rand-mask = random mask of the same "
                  "per-layer sparsity)." + (" With replicates: the mean ± the 95% CI half-width "
                                            "(n replicates); controls: their means; weight "
                                            "rewinding only." if max_replicates(rows) >= 2 else ""),
                  "", table]
    parts += replicate_sections(rows)
    parts += [] if lead else metrics
    imp = imp_table(records)
    if imp or "imp" in kinds:
        parts += ["## Iterative magnitude pruning", "", imp or "_no IMP chains finished yet_\n"]
    gmp = gmp_table(rows)  # lottery.report.gmp_rows
    if gmp or "gmp" in kinds:
        parts += ["## Gradual magnitude pruning vs tickets", "", GMP_NOTE, "",
                  gmp or "_no GMP points finished yet_\n"]
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
    compression, compression_plots, compression_table = compression_section(grid, records)  # quantize's exports
    parts += compression
    written_plots += compression_plots
    robustness, robustness_plots, _ = robustness_section(data)  # lottery robustness grids
    parts += robustness
    written_plots += robustness_plots
    if written_plots:
        parts += ["## Plots", ""]
        for path, caption in written_plots:
            parts += [f"![{path.stem}](plots/{path.name})", "", caption, ""]
    write_text(grid.report, "\n".join(parts))
    return {"grid": grid.root, "rows": len(rows), "total": total, "table": table, "imp_table": imp,
            "paired_table": paired_table(rows) if max_replicates(rows) >= 2 else "",
            "modes_table": modes_table(rows),
            "structured_table": structured, "compression_table": compression_table,
            "early_bird": eb_info,
            "dense_accuracy": dense, "parquet": grid.results_parquet, "csv": grid.results_csv,
            "report": grid.report, "plots": [path for path, _caption in written_plots],
            "validation_size": data.validation_size}
