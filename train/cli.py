"""`bigticket train dense ...`: train a dense network and print the run directory it wrote.

Settings come from `--preset NAME` (common.presets), then `--config FILE` (JSON/YAML with
DenseSettings' field names), then the flags given on the command line, each overriding the last. Every check (settings, dataset, rewind points) runs before any
training; a failure prints one line naming the flag, setting or file and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

import yaml

log = logging.getLogger(__name__)

# flag dest -> DenseSettings field (same name unless listed)
_FLAGS = ("data", "model", "engine", "epochs", "rewind", "out", "workers", "batch_size", "lr",
          "lr_schedule", "warmup_epochs", "lr_decay_epochs", "lr_decay_factor", "optimizer",
          "momentum", "weight_decay", "seed", "averaging", "early_stopping_patience",
          "early_stopping_metric", "mixed_precision", "deterministic", "input_size", "format",
          "augment", "cache", "shuffle_buffer", "master", "bn_l1", "early_bird",
          "early_bird_ratio", "early_bird_window", "early_bird_threshold", "stop_at_early_bird")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", required=True, metavar="COMMAND")
    dense = sub.add_parser("dense", help="train a dense network; prints the run directory",
                           description=__doc__.splitlines()[0])
    a = dense.add_argument
    a("--preset", metavar="NAME", help="start from a named preset of common.presets, e.g. "
      "early-bird-resnet20 (--config and flags override it)")
    a("--config", metavar="FILE", help="JSON/YAML file of settings (flags override it)")
    a("--data", metavar="DIR", help="dataset directory written by `bigticket etl prepare`")
    a("--model", help="mobilenet_v2, resnet20, resnet44, resnet56, lenet_300_100, conv_small")
    a("--model-option", dest="model_options", action="append", metavar="KEY=VALUE",
      help="model option, repeatable (e.g. alpha=0.35 for mobilenet_v2)")
    a("--engine", choices=("elephas", "local", "multiworker"))
    a("--epochs", type=int)
    a("--rewind", metavar="LIST", help="rewind checkpoints, e.g. 0ep,1ep,2ep,500it")
    a("--out", metavar="RUNS_ROOT", help="runs root; the run is RUNS_ROOT/dense-<hash>")
    a("--workers", type=int, help="elephas: Spark tasks per round")
    a("--averaging", help="elephas: 'epoch' or a number of steps K between averages")
    a("--batch-size", dest="batch_size", type=int, help="per worker")
    a("--lr", type=float, help="base learning rate")
    a("--lr-schedule", dest="lr_schedule", choices=("constant", "cosine", "step"))
    a("--warmup-epochs", dest="warmup_epochs", type=float)
    a("--lr-decay-epochs", dest="lr_decay_epochs", metavar="LIST", help="step schedule, e.g. 80,120")
    a("--lr-decay-factor", dest="lr_decay_factor", type=float)
    a("--optimizer", choices=("sgd", "adam"))
    a("--momentum", type=float)
    a("--weight-decay", dest="weight_decay", type=float)
    a("--seed", type=int)
    a("--early-stopping-patience", dest="early_stopping_patience", type=int)
    a("--early-stopping-metric", dest="early_stopping_metric", choices=("val_loss", "val_accuracy"))
    a("--mixed-precision", dest="mixed_precision", action=argparse.BooleanOptionalAction)
    a("--deterministic", action=argparse.BooleanOptionalAction)
    a("--cache", action=argparse.BooleanOptionalAction, help="cache encoded shards in memory")
    a("--input-size", dest="input_size", type=int)
    a("--format", choices=("tfrecord", "parquet"))
    a("--augment", choices=("none", "crop", "crop_flip"))
    a("--shuffle-buffer", dest="shuffle_buffer", type=int)
    a("--master", help="Spark master for --engine elephas (default: spark-submit's, or local[*])")
    bird = dense.add_argument_group("network slimming and Early-Bird tickets")
    b = bird.add_argument
    b("--bn-l1", dest="bn_l1", type=float, metavar="LAMBDA",
      help="L1 penalty on every BatchNorm scale (network slimming), e.g. 1e-4")
    b("--early-bird", dest="early_bird", action=argparse.BooleanOptionalAction,
      help="after each epoch, draw the BN channel mask and detect the Early-Bird ticket "
           "(writes early_bird.json, early_bird_masks.npz, checkpoint early_bird)")
    b("--early-bird-ratio", dest="early_bird_ratio", type=float, metavar="R",
      help="fraction of channels the mask prunes (default 0.5)")
    b("--early-bird-window", dest="early_bird_window", type=int, metavar="N",
      help="consecutive masks compared (default 5)")
    b("--early-bird-threshold", dest="early_bird_threshold", type=float, metavar="D",
      help="drawn when their max Hamming distance is under D (default 0.1)")
    b("--stop-at-early-bird", dest="stop_at_early_bird", action=argparse.BooleanOptionalAction,
      help="end dense training once the ticket is drawn (the run still completes)")
    dense.set_defaults(_train_run=_run_dense)


def _model_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-option: expected KEY=VALUE, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)  # typed: 0.35 -> float, 2 -> int
    return options


def settings_from_args(args: argparse.Namespace):
    from common.settings import load_settings_file, make_settings
    from train.settings import DenseSettings

    values = {}
    if getattr(args, "preset", None):
        from common.presets import preset

        values.update(preset(args.preset, "dense"))  # ValueError names the preset
    if args.config:
        values.update(load_settings_file(args.config))
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.model_options:
        values["model_options"] = {**values.get("model_options", {}),
                                   **_model_options(args.model_options)}
    if isinstance(values.get("lr_decay_epochs"), str):
        try:
            values["lr_decay_epochs"] = [int(v) for v in values["lr_decay_epochs"].split(",") if v]
        except ValueError:
            raise ValueError(f"--lr-decay-epochs: expected integers, got "
                             f"{values['lr_decay_epochs']!r}") from None
    averaging = values.get("averaging")
    if isinstance(averaging, str) and averaging.isdigit():
        values["averaging"] = int(averaging)
    for required in ("data", "model"):
        if not values.get(required):
            raise ValueError(f"--{required} is required (or set {required!r} in --config)")
    return make_settings(DenseSettings, values)


def _run_dense(args: argparse.Namespace) -> int:
    from train.run import prepare_run, train_dense

    try:
        settings = settings_from_args(args)
        prepare_run(settings)  # every check before TensorFlow, Spark or any training starts
    except (ValueError, OSError) as err:
        print(f"bigticket train dense: error: {err}", file=sys.stderr)
        return 2
    run = train_dense(settings)
    print(run.root)
    return 0


def run(args: argparse.Namespace) -> int:
    return args._train_run(args)
