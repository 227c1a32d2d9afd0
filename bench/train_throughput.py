"""Training throughput (issue 3, performance): prints a table, writes bench/results/train_throughput.json.

(a) images/s of the tf.data pipeline alone (train.data.make_dataset) against
    keras.utils.image_dataset_from_directory over the same images written out as JPEG files;
    target: at least 3x.
(b) `local` engine training against plain `model.fit` on in-memory arrays of the same decoded
    images: the pipeline's cost, target under 10%.
(c) the `elephas` engine: fixed cost per round and throughput with N workers against `local` on
    the same cores (stock elephas: about 13 s a round on a tiny MobileNetV2; target under 2 s).

Usage: .venv/bin/python bench/train_throughput.py [--data DATASET_DIR] [--model mobilenet_v2]
Without --data, the digits dataset is prepared at 32x32 with the ETL job on local Spark.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import write_json  # noqa: E402
from common.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.train_throughput")
RESULTS = REPO / "bench" / "results" / "train_throughput.json"


def _rate(ds, passes: int) -> tuple[float, int]:
    """images/s over `passes` full iterations of a dataset (after one warm-up pass)."""
    images = 0
    for x, _ in ds:  # warm-up: fills caches, traces functions
        pass
    t0 = time.perf_counter()
    for _ in range(passes):
        for x, _ in ds:
            images += int(x.shape[0])
    return images / (time.perf_counter() - t0), images


def _export_jpegs(info, folder: Path) -> int:
    """The train split's JPEG bytes as class_NNNN/<shard>-<i>.jpg files (the baseline's input)."""
    from etl.tfrecord import decode_example, iter_records

    tmp = folder.with_name(folder.name + ".tmp")
    count = 0
    for shard in info.shard_files("train", "tfrecord"):
        for i, record in enumerate(iter_records(shard.path)):
            example = decode_example(record)
            label = example["image/class/label"][0] - info.label_offset
            target = tmp / f"class_{label:04d}"
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{shard.path.stem}-{i}.jpg").write_bytes(example["image/encoded"][0])
            count += 1
    os.replace(tmp, folder)
    return count


def bench_pipeline(info, settings, work: Path, passes: int) -> dict:
    """(a) our pipeline vs image_dataset_from_directory over the same JPEG files."""
    import keras

    from train.data import make_dataset

    folder = work / "jpeg-folder"
    if not folder.exists():
        log.info("wrote %d JPEG files under %s", _export_jpegs(info, folder), folder)
    size, batch = settings.input_size, settings.batch_size
    ours = make_dataset(info, "train", batch_size=batch, training=True, input_size=size,
                        fmt=settings.format, augment=settings.augment)
    ours_eval = make_dataset(info, "train", batch_size=batch, training=False, input_size=size,
                             fmt=settings.format)
    theirs = keras.utils.image_dataset_from_directory(
        str(folder), image_size=(size, size), batch_size=batch, shuffle=True, seed=0,
        verbose=False)
    ours_rate, n = _rate(ours, passes)
    ours_eval_rate, _ = _rate(ours_eval, passes)
    theirs_rate, m = _rate(theirs, passes)
    return {"images": n, "ours_train_images_per_s": ours_rate,
            "ours_eval_images_per_s": ours_eval_rate,
            "image_dataset_from_directory_images_per_s": theirs_rate,
            "speedup": ours_rate / theirs_rate, "target_speedup": 3.0,
            "baseline_images": m}


def bench_local(info, settings, epochs: int) -> dict:
    """(b) local engine (pipeline + fit) vs model.fit on decoded in-memory arrays."""
    import numpy as np

    from train.data import make_dataset
    from train.local_engine import LocalEngine, compile_kwargs, model_builder, optimizer_builder

    engine = LocalEngine(settings, info)
    rates = [engine.train_epoch(e, settings.lr)["images_per_s"] for e in range(epochs)]
    xs, ys = [], []
    for x, y in make_dataset(info, "train", batch_size=256, training=False,
                             input_size=settings.input_size, fmt=settings.format):
        xs.append(x.numpy())
        ys.append(y.numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    model = model_builder(settings, info.num_classes)()
    model.compile(optimizer=optimizer_builder(settings)(), **compile_kwargs())
    plain = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=settings.batch_size, epochs=1, shuffle=True, verbose=0)
        plain.append(len(x) / (time.perf_counter() - t0))
    ours, base = max(rates[1:] or rates), max(plain[1:] or plain)  # steady state, not tracing
    return {"local_images_per_s": ours, "plain_fit_images_per_s": base,
            "pipeline_overhead": 1.0 - ours / base, "target_overhead": 0.10,
            "local_epochs_images_per_s": rates, "plain_epochs_images_per_s": plain}


def bench_elephas(info, settings, workers: int, epochs: int, master: str) -> dict:
    """(c) elephas rounds: fixed cost per round and throughput vs local on the same cores."""
    import dataclasses

    from common.spark import get_spark
    from train.run import ElephasEngine

    spark = get_spark("bench-train-throughput", master)
    s = dataclasses.replace(settings, engine="elephas", workers=workers)
    engine = ElephasEngine(s, info, spark=spark)
    try:
        per_epoch = [engine.train_epoch(e, s.lr) for e in range(epochs)]
    finally:
        engine.close()
    steady = per_epoch[1:] or per_epoch  # the first round builds the model on every worker
    return {"workers": workers, "master": master,
            "round_fixed_cost_s": min(m["round_fixed_cost_s"] for m in steady),
            "first_round_fixed_cost_s": per_epoch[0]["round_fixed_cost_s"],
            "elephas_images_per_s": max(m["images_per_s"] for m in steady),
            "target_fixed_cost_s": 2.0, "stock_elephas_fixed_cost_s": 13.0}


def _dataset(args, work: Path) -> Path:
    if args.data:
        return Path(args.data)
    from etl.job import prepare
    from etl.settings import EtlSettings

    out = work / "digits32"
    prepare(EtlSettings(source="digits", out=str(out), resize="fixed:32", format="both",
                        train_shards=4, validation_shards=2), master=args.master)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset directory (default: digits at 32x32, prepared here)")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--format", choices=("tfrecord", "parquet"), default="tfrecord")
    parser.add_argument("--passes", type=int, default=3, help="(a) timed passes over the data")
    parser.add_argument("--epochs", type=int, default=3, help="(b), (c) epochs, first excluded")
    parser.add_argument("--workers", type=int, default=2, help="(c) elephas workers")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--skip", action="append", default=[], choices=("a", "b", "c"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from train.cli import _model_options
    from train.data import open_dataset
    from train.local_engine import configure_tensorflow
    from train.run import resolve_settings
    from train.settings import DenseSettings

    options = _model_options(args.model_option) or (
        {"alpha": 0.35} if args.model == "mobilenet_v2" else {})
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        info = open_dataset(_dataset(args, work))
        settings = resolve_settings(DenseSettings(
            data=str(info.root), model=args.model, model_options=options,
            batch_size=args.batch_size, format=args.format, augment="crop", lr=0.01,
            deterministic=False), info)
        configure_tensorflow(settings)
        results = {"dataset": str(info.root), "train_records": info.records["train"],
                   "model": args.model, "model_options": options, "batch_size": args.batch_size,
                   "input_size": settings.input_size, "cpus": os.cpu_count()}
        if "a" not in args.skip:
            results["a_pipeline"] = bench_pipeline(info, settings, work, args.passes)
        if "b" not in args.skip:
            results["b_local_vs_fit"] = bench_local(info, settings, args.epochs)
        if "c" not in args.skip:
            results["c_elephas"] = bench_elephas(info, settings, args.workers, args.epochs,
                                                 args.master)
            if "b_local_vs_fit" in results:
                results["c_elephas"]["local_images_per_s"] = \
                    results["b_local_vs_fit"]["local_images_per_s"]
    write_json(args.out, results)
    rows = []
    if "a_pipeline" in results:
        a = results["a_pipeline"]
        rows += [("(a) tf.data pipeline, train", f"{a['ours_train_images_per_s']:.0f} img/s", ""),
                 ("(a) tf.data pipeline, eval", f"{a['ours_eval_images_per_s']:.0f} img/s", ""),
                 ("(a) image_dataset_from_directory",
                  f"{a['image_dataset_from_directory_images_per_s']:.0f} img/s",
                  f"speedup {a['speedup']:.1f}x (target >= 3x)")]
    if "b_local_vs_fit" in results:
        b = results["b_local_vs_fit"]
        rows += [("(b) local engine", f"{b['local_images_per_s']:.0f} img/s", ""),
                 ("(b) model.fit on arrays", f"{b['plain_fit_images_per_s']:.0f} img/s",
                  f"overhead {100 * b['pipeline_overhead']:.1f}% (target < 10%)")]
    if "c_elephas" in results:
        c = results["c_elephas"]
        rows += [(f"(c) elephas, {c['workers']} workers", f"{c['elephas_images_per_s']:.0f} img/s",
                  f"fixed cost {c['round_fixed_cost_s']:.2f} s/round (first "
                  f"{c['first_round_fixed_cost_s']:.2f} s; target < 2 s)")]
    width = max(len(r[0]) for r in rows) if rows else 0
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
