"""`bigticket report`: write a grid's results.parquet, results.csv, plots/*.png and report.md.

Reads only files (lottery.report.results), so it runs on any machine that sees the grid
directory, while the grid is still running too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.atomic import write_text
from common.paths import DenseRunPaths, GridPaths
from lottery.grid.plan import load_plan
from lottery.report import plots
from lottery.report.results import dense_accuracy, early_bird_info, early_bird_masks, read_records, result_row
from lottery.report.tables import (
    accuracy_table,
    early_bird_summary,
    fmt_accuracy,
    imp_table,
    rewind_order,
    structured_table,
    write_tables,
)
from train.early_bird import distance_matrix


def build_report(grid_dir: str | os.PathLike) -> dict[str, Any]:
    """Write results.parquet, results.csv, plots/*.png and report.md; returns what was written."""
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
        written_plots.append(plots.early_bird_heatmap(
            grid.plots / "early_bird_distances.png", eb_epochs, distance_matrix(eb_masks),
            eb_info.get("drawn_epoch")))
    kinds = {t.kind for t in plan["tasks"]}
    table = accuracy_table(rows, rewinds) if kinds != {"structured"} else ""
    structured = structured_table(rows, positions)
    total = len(plan["tasks"])
    parts = [f"# Lottery grid {grid.root.name}", "",
             f"Dense run: `{grid.root.parent.name}`; dense accuracy: {fmt_accuracy(dense)}; "
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
