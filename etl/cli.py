"""`bigticket etl prepare ...` and `bigticket etl verify DIR`."""
from __future__ import annotations

import argparse
import logging

from common.settings import SettingsError, load_settings_file, make_settings

log = logging.getLogger(__name__)

# CLI flag -> EtlSettings field, for the flags whose names differ from the field.
_RENAMED = {"shards": "train_shards", "val_ground_truth": "val_ground_truth_file"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="etl_command", required=True, metavar="COMMAND")
    prep = sub.add_parser("prepare", help="build a sharded TFRecord/Parquet dataset with Spark")
    prep.add_argument("--config", help="JSON/YAML file of settings; flags override it")
    prep.add_argument("--source", choices=["imagenet-folder", "imagenet-tar", "cifar10", "cifar100",
                                           "urls", "digits"])
    prep.add_argument("--input", help="the source's path (not needed for digits)")
    prep.add_argument("--out", help="the dataset directory to write")
    prep.add_argument("--resize", help="fixed:N (squash), center:N (shorter side, centre crop) or "
                                       "shorter:N (keep aspect); default fixed:64")
    prep.add_argument("--format", choices=["tfrecord", "parquet", "both"])
    prep.add_argument("--shards", type=int, help="train shards (default 8)")
    prep.add_argument("--validation-shards", type=int,
                      help="validation shards (default: train shards / 8, at least 1)")
    prep.add_argument("--quality", type=int, help="JPEG quality 1-100 (default 90)")
    prep.add_argument("--seed", type=int, help="seed of the stable shard shuffling (default 0)")
    prep.add_argument("--master", help="Spark master URL (default: spark-submit's, else local[*])")
    prep.add_argument("--synsets-file", help="class order: one synset per line")
    prep.add_argument("--synset-words-file", help="'<synset>\\t<words>' lines for image/class/text")
    prep.add_argument("--val-ground-truth", help="flat validation labels: line i = synset or index")
    prep.add_argument("--validation-fraction", type=float, help="digits/urls: held-out fraction")
    prep.add_argument("--allow-private-addresses", action="store_true", default=None,
                      help="urls: allow loopback/private/link-local hosts (off by default)")
    prep.add_argument("--download-timeout", type=float, help="urls: seconds per request")
    prep.add_argument("--download-retries", type=int, help="urls: retries with backoff")
    prep.add_argument("--max-redirects", type=int, help="urls: redirect limit")
    prep.add_argument("--max-image-bytes", type=int, help="per-image byte cap")
    prep.add_argument("--max-image-pixels", type=int, help="decompression-bomb pixel limit")

    from etl import verify

    verify.add_arguments(sub.add_parser(
        "verify", help="re-read every shard and check it against the manifest"))


def settings_from_args(args: argparse.Namespace):
    from etl.settings import EtlSettings

    values = load_settings_file(args.config) if args.config else {}
    skip = {"config", "master", "etl_command", "stage", "_stage_module"}
    for name, value in vars(args).items():
        if name in skip or value is None:
            continue
        values[_RENAMED.get(name, name)] = value
    if "validation_shards" not in values and "train_shards" in values:
        values["validation_shards"] = max(1, values["train_shards"] // 8)
    for required in ("source", "out"):
        if required not in values:
            raise SettingsError(f"--{required} is required")
    return make_settings(EtlSettings, values)


def run(args: argparse.Namespace) -> int:
    if args.etl_command == "prepare":
        from etl.job import EtlError, prepare

        try:
            settings = settings_from_args(args)
            manifest = prepare(settings, master=args.master)
        except (SettingsError, EtlError, ValueError) as err:
            log.error("%s", err)
            return 2
        for split, info in manifest["splits"].items():
            print(f"{split}: {info['records']} written, {info['quarantined']} quarantined "
                  f"of {info['inputs']} inputs")
        print(settings.out)
        return 0
    from etl import verify

    return verify.run(args)

