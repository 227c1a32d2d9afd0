"""`bigticket train dense ...`: train a dense network and print the run directory it wrote.

The flags are DenseSettings' fields (common.cli). Settings come from `--preset NAME`
(common.presets), then `--config FILE` (JSON/YAML with DenseSettings' field names), then the flags,
each overriding the last. Every check (settings, dataset, rewind points) runs before any training;
a failure prints one line naming the flag, setting or file and exits with status 2.
"""
from __future__ import annotations

import argparse

from common.cli import SettingsFlags, usage_error
from train.run import prepare_run, train_dense
from train.settings import DenseSettings

FLAGS = SettingsFlags(DenseSettings, preset_stage="dense", groups={
    "network slimming and Early-Bird tickets": (
        "bn_l1", "early_bird", "early_bird_ratio", "early_bird_window", "early_bird_threshold",
        "stop_at_early_bird"),
})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", required=True, metavar="COMMAND")
    dense = sub.add_parser("dense", help="train a dense network; prints the run directory",
                           description=__doc__.splitlines()[0])
    dense.add_argument("--preset", metavar="NAME", help="start from a named preset of "
                       "common.presets, e.g. early-bird-resnet20 (--config and flags override it)")
    dense.add_argument("--config", metavar="FILE",
                       help="JSON/YAML file of settings (flags override it)")
    FLAGS.add_arguments(dense)
    dense.set_defaults(_train_run=_run_dense)


def settings_from_args(args: argparse.Namespace) -> DenseSettings:
    return FLAGS.resolve(args)


def _run_dense(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        prepare_run(settings)  # every check before TensorFlow, Spark or any training starts
    except (ValueError, OSError) as err:
        return usage_error(args, err)
    run = train_dense(settings)
    print(run.root)
    return 0


def run(args: argparse.Namespace) -> int:
    return args._train_run(args)
