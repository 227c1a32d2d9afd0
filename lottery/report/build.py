"""`bigticket report`: write a grid's results.parquet, results.csv, plots/*.png and report.md.

Reads only files (lottery.report.results), so it runs on any machine that sees the grid
directory, while the grid is still running too.
"""
from __future__ import annotations

import os
from typing import Any

from common.atomic import write_text
from lottery.report import plots
from lottery.report.results import read_report_data
from lottery.report.tables import (
    accuracy_table,
    early_bird_summary,
    fmt_accuracy,
    imp_table,
    structured_table,
    validation_note,
    write_tables,
)


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
    if table:
        parts += ["## Accuracy after retraining (one-shot masks)", "",
                  "Rows: real sparsity of the mask; columns: rewind point; cells: accuracy, then the "
                  "controls (reinit = same mask, random init; rand-mask = random mask of the same "
                  "per-layer sparsity).", "", table]
    imp = imp_table(records)
    if imp or "imp" in kinds:
        parts += ["## Iterative magnitude pruning", "", imp or "_no IMP chains finished yet_\n"]
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
        parts += ["## Plots", ""]
        for path, caption in written_plots:
            parts += [f"![{path.stem}](plots/{path.name})", "", caption, ""]
    write_text(grid.report, "\n".join(parts))
    return {"grid": grid.root, "rows": len(rows), "total": total, "table": table, "imp_table": imp,
            "structured_table": structured, "early_bird": eb_info,
            "dense_accuracy": dense, "parquet": grid.results_parquet, "csv": grid.results_csv,
            "report": grid.report, "plots": [path for path, _caption in written_plots],
            "validation_size": data.validation_size}
