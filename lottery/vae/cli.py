"""`bigticket lottery vae-study` (also `python -m lottery.vae.cli`): the VAE neuron-pruning study.

Prints the table of the study (criterion x ratio: parameters, reconstruction / KL / total loss
before pruning, after pruning and after fine-tuning) and the study directory; `--json` prints
results.json instead. Errors in settings name the flag (and the settings field it sets).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# flag dest -> VaeStudySettings field (the same names; listed so only these flags become settings)
_FIELDS = ("data", "out", "hidden", "decoder_hidden", "latent_dim", "activation", "epochs",
           "finetune_epochs", "batch_size", "lr", "finetune_lr", "criteria", "ratios", "seed",
           "image_size", "format", "max_records")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset directory written by `bigticket etl` (e.g. digits)")
    parser.add_argument("--out", help="root of the study directory out/vae-<hash> (default: runs)")
    parser.add_argument("--config", type=Path, help="JSON/YAML file of study settings (flags override)")
    model = parser.add_argument_group("model and training")
    model.add_argument("--hidden", help="encoder hidden widths, input side first (default 256,128)")
    model.add_argument("--decoder-hidden", dest="decoder_hidden",
                       help="decoder hidden widths (default: the encoder's, mirrored)")
    model.add_argument("--latent-dim", dest="latent_dim", type=int, help="latent units (default 8)")
    model.add_argument("--activation", help="hidden activation: relu, elu, tanh, gelu, swish")
    model.add_argument("--epochs", type=int, help="training epochs of the VAE (default 30)")
    model.add_argument("--batch-size", dest="batch_size", type=int, help="default 64")
    model.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    model.add_argument("--seed", type=int, help="seed of initialisation, shuffling and noise")
    model.add_argument("--image-size", dest="image_size", type=int,
                       help="side images are resized to (default: the dataset's)")
    model.add_argument("--format", help="shard format to read: tfrecord or parquet")
    model.add_argument("--max-records", dest="max_records", type=int,
                       help="refuse larger splits (pixels are held in memory; default 200000)")
    study = parser.add_argument_group("pruning")
    study.add_argument("--criteria", help="neuron criteria, e.g. l1,l2,fpgm (the default)")
    study.add_argument("--ratios", help="fractions of each hidden layer's neurons to remove "
                                        "(default 0.2,0.5,0.8)")
    study.add_argument("--finetune-epochs", dest="finetune_epochs", type=int,
                       help="fine-tuning epochs of each pruned VAE (default 5)")
    study.add_argument("--finetune-lr", dest="finetune_lr", type=float,
                       help="fine-tuning learning rate (default: --lr)")
    parser.add_argument("--json", action="store_true", help="print results.json instead of the table")


class _BadSettings(ValueError):
    pass


def settings_from_args(args):
    """VaeStudySettings from --config and the flags; _BadSettings names the flag at fault."""
    import pydantic

    from common.settings import SettingsError, load_settings_file
    from lottery.vae.study import VaeStudySettings

    values, from_flag = {}, set()
    if args.config is not None:
        try:
            values.update(load_settings_file(args.config))
        except (OSError, ValueError) as err:
            raise _BadSettings(f"--config: {args.config}: {err}") from None
    for field in _FIELDS:
        value = getattr(args, field, None)
        if value is not None:
            values[field] = value
            from_flag.add(field)
    if "data" not in values:
        raise _BadSettings("--data: the dataset directory is required (or `data` in --config)")
    try:
        return VaeStudySettings(**values)
    except pydantic.ValidationError as err:
        problems = []
        for e in err.errors():
            field = str(e["loc"][0]) if e["loc"] else ""
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
                message = "unknown setting"
            where = (_flag(field) if field in from_flag
                     else f"{field} in {args.config}" if args.config is not None else field)
            problems.append(f"{where}: {message}")
        raise _BadSettings("; ".join(problems)) from None
    except SettingsError as err:
        raise _BadSettings(str(err)) from None


def run(args) -> int:
    try:
        settings = settings_from_args(args)
    except _BadSettings as err:
        print(f"vae-study: error: {err}", file=sys.stderr)
        return 2
    from common.atomic import read_json
    from lottery.vae.study import format_table, run_study

    try:
        paths = run_study(settings)
    except ValueError as err:  # bad dataset or sizes: the message names the file or setting
        print(f"vae-study: error: {err}", file=sys.stderr)
        return 1
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
    from common.logs import setup_logging

    setup_logging()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
