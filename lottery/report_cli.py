"""`bigticket report GRID_DIR`: results tables, report.md and plots of a lottery grid."""
from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import remember_prog, usage_error
from common.settings import SettingsError
from lottery.report.build import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    remember_prog(parser)
    parser.add_argument("grid", type=Path, help="a lottery grid directory (lottery-<hash>)")


def run(args) -> int:
    try:
        out = build_report(args.grid)
    except (SettingsError, FileNotFoundError) as err:
        return usage_error(args, err)
    dense = "unknown" if out["dense_accuracy"] is None else f"{out['dense_accuracy']:.4f}"
    print(f"{out['grid']}: {out['rows']}/{out['total']} points; dense accuracy {dense}\n")
    for table in (out["table"], out.get("paired_table"), out.get("modes_table"), out["imp_table"],
                  out["structured_table"], out.get("compression_table")):
        if table:
            print(table)
    for path in (out["report"], out["csv"], out["parquet"], *out["plots"]):
        print(path)
    return 0
