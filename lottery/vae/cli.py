"""`bigticket lottery vae-study` (also `python -m lottery.vae.cli`): the VAE neuron-pruning study.

Prints the table of the study (criterion x ratio: parameters, reconstruction / KL / total loss
before pruning, after pruning and after fine-tuning) and the study directory; `--json` prints
results.json instead. The flags are VaeStudySettings' fields (common.cli), after `--config`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.atomic import read_json
from common.cli import SettingsFlags, usage_error
from common.logs import setup_logging
from lottery.vae.study import VaeStudySettings, format_table, run_study

FLAGS = SettingsFlags(VaeStudySettings, groups={
    "model and training": ("hidden", "decoder_hidden", "latent_dim", "activation", "epochs",
                           "batch_size", "lr", "seed", "image_size", "format", "max_records"),
    "pruning": ("criteria", "ratios", "finetune_epochs", "finetune_lr"),
})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="JSON/YAML file of study settings (flags override)")
    parser.add_argument("--json", action="store_true", help="print results.json instead of the table")
    FLAGS.add_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> VaeStudySettings:
    return FLAGS.resolve(args)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        paths = run_study(settings)
    except ValueError as err:  # settings, or a bad dataset or sizes: the message names the culprit
        return usage_error(args, err)
    results = read_json(paths.results_json)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print(format_table(results["rows"]))
        print(f"\n{paths.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lottery.vae.cli",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
