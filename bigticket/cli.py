"""`bigticket <stage> ...`: dispatches to the stage's own CLI module, imported lazily.

Lazy imports keep `bigticket etl` free of TensorFlow and `bigticket --help` instant.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from common.logs import separate_stderr_under_spark_submit, setup_logging
from common.native_logs import quiet_tensorflow

# stage name -> (module with `add_arguments(parser)` and `run(args) -> int`, help line)
STAGES = {
    "etl": ("etl.cli", "prepare and verify image datasets with Spark"),
    "train": ("train.cli", "dense training (Elephas over Spark, tf.distribute)"),
    "lottery": ("lottery.cli", "masks x rewind grids, run over MPI or job arrays"),
    "report": ("lottery.report_cli", "tables and plots of a lottery grid"),
    "quantize": ("deploy.cli", "LiteRT exports (float32/float16/int8) of a run, point or grid, measured"),
    "slurm": ("bigticket.slurm", "submit the whole pipeline to SLURM as a dependency chain"),
    "demo": ("bigticket.demo", "the whole pipeline on the embedded digits dataset"),
}


def build_parser(available: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigticket", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module_name, help_line) in available.items():
        stage_parser = sub.add_parser(name, help=help_line, description=help_line)
        module = importlib.import_module(module_name)
        module.add_arguments(stage_parser)
        stage_parser.set_defaults(_stage_module=module)
    return parser


def _importable(module_name: str) -> bool:
    return importlib.util.find_spec(module_name) is not None


def main(argv: list[str] | None = None) -> int:
    separate_stderr_under_spark_submit()  # before parsing: usage errors are stderr too
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the requested stage; with no known stage, list every stage for --help.
    if argv and argv[0] in STAGES:
        chosen = {argv[0]: STAGES[argv[0]]}
    else:
        chosen = {k: v for k, v in STAGES.items() if _importable(v[0])}
    args = build_parser(chosen).parse_args(argv)
    setup_logging()
    quiet_tensorflow()  # before any stage imports TensorFlow
    return int(args._stage_module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
