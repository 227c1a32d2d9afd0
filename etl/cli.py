"""`bigticket etl prepare ...` and `bigticket etl verify DIR`.

The flags of `prepare` are EtlSettings' fields (common.cli); `--config FILE` holds the same
settings under their field names and the flags override it. `prepare` prints the dataset directory
and nothing else on stdout (scripts read it; the progress goes to the log on stderr). Exit status:
0 done, 1 the job ran but its result is not a usable dataset (nothing published; the summary
says why), 2 a usage error (flag, setting, input or output folder).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from common.cli import SettingsFlags, usage_error
from common.settings import SettingsError
from etl import verify
from etl.job import EtlError, prepare
from etl.manifest import DatasetUnusable
from etl.settings import EtlSettings

FLAGS = SettingsFlags(EtlSettings)
EXIT_JOB_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="etl_command", required=True, metavar="COMMAND")
    prep = sub.add_parser("prepare", help="build a sharded TFRecord/Parquet dataset with Spark")
    prep.add_argument("--config", help="JSON/YAML file of settings; flags override it")
    prep.add_argument("--master", help="Spark master URL (default: spark-submit's, else local[*])")
    FLAGS.add_arguments(prep)
    verify.add_arguments(sub.add_parser(
        "verify", help="re-read every shard and check it against the manifest"))


def _validation_shards(values: dict[str, Any]) -> None:
    """Validation shards follow the train shards (an eighth, at least 1) unless given."""
    if "validation_shards" not in values and isinstance(values.get("train_shards"), int):
        values["validation_shards"] = max(1, values["train_shards"] // 8)


def settings_from_args(args: argparse.Namespace) -> EtlSettings:
    return FLAGS.resolve(args, fill=_validation_shards)


def run(args: argparse.Namespace) -> int:
    if args.etl_command != "prepare":
        return verify.run(args)
    try:
        settings = settings_from_args(args)
        prepare(settings, master=args.master)
    except DatasetUnusable as failed:
        print(f"{getattr(args, '_prog', 'bigticket etl prepare')}: failed: {failed}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except (SettingsError, EtlError, ValueError) as err:  # UsageError is a ValueError
        return usage_error(args, err)
    print(settings.out)  # the split counts are in the job's log
    return 0
