"""`bigticket quantize`: LiteRT exports of a dense run, a grid point or a whole grid, measured.

Prints the results.json of each target quantised (one path a line) on stdout.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.cli import remember_prog, report_error, usage_error
from common.presets import preset

log = logging.getLogger(__name__)

VARIANT_HELP = ("comma-separated LiteRT variants: float32, float16, dynamic_int8, full_int8 (default: "
                "all four), each optionally suffixed _sparse")
SPARSE_HELP = ("also write each variant with the converter's EXPERIMENTAL_SPARSITY storage "
               "(<variant>_sparse): pruned weights take fewer bytes in the file; LiteRT densifies "
               "them when it loads the model, so it saves bytes, not time; XNNPACK refuses "
               "dynamic_int8_sparse, which then runs on LiteRT's slower builtin kernels "
               "(bench/compression.py measures both)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    remember_prog(parser)
    parser.description = __doc__.splitlines()[0]
    what = parser.add_argument_group("what to quantise (one of --run or --grid)")
    what.add_argument("--run", type=Path, metavar="RUN_DIR", help="a dense run directory (dense-<hash>)")
    what.add_argument("--label", metavar="CHECKPOINT", default=None,
                      help="with --run: the checkpoint to export (default final; e.g. init, 3ep)")
    what.add_argument("--grid", type=Path, metavar="GRID_DIR",
                      help="a lottery grid: every finished point, or only --point")
    what.add_argument("--point", metavar="TASK_ID", help="with --grid: one finished point")
    how = parser.add_argument_group("variants and measurement")
    how.add_argument("--variants", default=None, help=VARIANT_HELP)
    how.add_argument("--preset", default=None,
                     help="take the variants of a named recipe (common.presets, e.g. super-resnet20)")
    how.add_argument("--sparse", action="store_true", help=SPARSE_HELP)
    how.add_argument("--int8-io", action="store_true",
                     help="full_int8: int8 input and output tensors (default float32)")
    how.add_argument("--representative", type=int, default=200, metavar="N",
                     help="train images calibrating full_int8 (default 200)")
    how.add_argument("--max-records", type=int, default=None, metavar="N",
                     help="evaluate on the first N validation images only (default all)")
    how.add_argument("--seconds", type=float, default=2.0,
                     help="timing window of the one-thread images/s per variant (default 2)")
    how.add_argument("--data", metavar="DIR", default=None,
                     help="the dataset, when it moved since training (same manifest required)")


def _options(args):
    from deploy import litert
    from deploy.quantize import Options

    chosen = (preset(args.preset, "quantize") if args.preset else {}).get("variants")
    if args.variants is not None:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = tuple(chosen or litert.VARIANTS)
    if args.sparse:
        variants += tuple(v + litert.SPARSE_SUFFIX for v in variants
                          if not v.endswith(litert.SPARSE_SUFFIX))
    return Options(variants=variants, int8_io=args.int8_io, representative=args.representative,
                   max_records=args.max_records, seconds=args.seconds, data=args.data)


def _targets(args):
    from deploy.targets import grid_targets, point_target, run_target

    if (args.run is None) == (args.grid is None):
        raise ValueError("--run / --grid: give exactly one (a dense run, or a grid with optional --point)")
    if args.run is not None:
        if args.point is not None:
            raise ValueError("--point: needs --grid (a point belongs to a grid), not --run")
        return [run_target(args.run, args.label or "final")], []
    if args.label is not None:
        raise ValueError("--label: only with --run (a grid point exports its own trained network)")
    if args.point is not None:
        return [point_target(args.grid, args.point)], []
    targets, missing = grid_targets(args.grid)
    if not targets and not missing:
        raise ValueError(f"--grid {args.grid}: no finished points yet")
    return targets, missing


def run(args) -> int:
    from deploy.litert import ConversionError
    from deploy.quantize import quantize_target
    from deploy.targets import TargetError

    try:
        options = _options(args)
        targets, missing = _targets(args)
    except (TargetError, ValueError) as err:
        return usage_error(args, err)
    try:
        from tqdm.auto import tqdm

        for target in tqdm(targets, desc="quantize", unit="target", disable=len(targets) < 2):
            quantize_target(target, options)
            print(target.paths.results, flush=True)
    except ConversionError as err:
        return report_error(args, err)
    except TargetError as err:
        return usage_error(args, err)
    if missing:
        return report_error(args, f"{len(missing)} finished point(s) kept no trained network and were "
                                  f"not quantised: {', '.join(missing)}")
    return 0
