"""Post-training quantisation side by side: file bytes, gzip bytes, accuracy and one-thread LiteRT
images/s of every variant against float32, for lenet_300_100, resnet20 and mobilenet_v2.

Each model is trained briefly on digits at 32x32 (`--epochs`; Adam, no augmentation) so that
accuracy drops mean something, then converted by deploy.litert to float32, float16, dynamic_int8
and full_int8 (calibrated on `--representative` train images), evaluated through the LiteRT
interpreter on the whole validation split and timed on ONE interpreter thread: `--rounds` rounds,
the variants interleaved within each round (machine load hits all alike), each a `--seconds` window
of invokes at batch 32 timed by the calling thread's CPU clock (stable on a shared machine); the
figure is the median over rounds. A 90%-pruned copy of each trained model (one-shot magnitude per
layer, no fine-tuning: only its bytes matter) is converted too, plain and with sparse storage.

Targets (issue 12): int8 (dynamic and full-integer) file <= 0.32x float32, float16 <= 0.52x,
accuracy drop <= 1 point each; gzip of the 90%-pruned dynamic-int8 file <= 0.10x the gzip of the
dense float32 file; full-integer int8 images/s >= 1.5x float32 for resnet20 and mobilenet_v2.
Without --data, digits is prepared at 32x32 with `bigticket etl prepare --source digits`.
Prints a table and writes JSON (bench/results/compression.json).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common.atomic import write_json  # noqa: E402
from common.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.compression")
RESULTS = REPO / "bench" / "results" / "compression.json"
MODELS = {"lenet_300_100": {}, "resnet20": {"bn_momentum": 0.9},
          "mobilenet_v2": {"bn_momentum": 0.9}}
DENSE = ("float32", "float16", "dynamic_int8", "full_int8")
PRUNED = ("float32", "dynamic_int8", "float32_sparse", "dynamic_int8_sparse", "full_int8_sparse")
SPEED_MODELS = ("resnet20", "mobilenet_v2")
TARGETS = {"int8_bytes": 0.32, "float16_bytes": 0.52, "accuracy_drop": 0.01, "pruned_gzip": 0.10,
           "int8_speedup": 1.5}


def prepare_digits(out: Path) -> Path:
    cmd = [sys.executable, "-m", "bigticket", "etl", "prepare", "--source", "digits", "--out", str(out),
           "--resize", "fixed:32", "--format", "tfrecord", "--shards", "3", "--validation-shards", "2"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def train(name: str, options: dict, data, epochs: int, seed: int):
    import keras

    from train.models import build_model

    (x, y), (vx, vy) = data
    keras.utils.set_random_seed(seed)
    model = build_model(name, int(y.max()) + 1, x.shape[1], **options)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    if epochs:
        model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    return model


def _layers(layer):
    for sub in getattr(layer, "layers", ()):
        yield sub
        yield from _layers(sub)


def prune(model, sparsity: float):
    """A copy with the smallest `sparsity` of each kernel set to exactly zero."""
    import keras

    pruned = keras.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    for layer in _layers(pruned):
        for attr in ("kernel", "depthwise_kernel"):
            var = getattr(layer, attr, None)
            if var is not None:
                w = np.array(var)
                w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
                var.assign(w)
    return pruned


def keras_accuracy(model, vx, vy) -> float:
    scores = np.concatenate([model.predict_on_batch(vx[i:i + 256]) for i in range(0, len(vx), 256)])
    return float(np.mean(np.argmax(scores, axis=1) == vy))


def measure_model(name, model, data, args) -> dict:
    from deploy import litert, measure

    (x, _y), (vx, vy) = data
    rep = x[: args.representative]
    reference = keras_accuracy(model, vx, vy)
    files = {v: litert.convert(model, v, representative=lambda: [rep]) for v in DENSE}
    pruned_model = prune(model, 0.9)
    pruned_files = {v: litert.convert(pruned_model, v, representative=lambda: [rep]) for v in PRUNED}
    arms = {**files, **{f"pruned90_{v}": b for v, b in pruned_files.items()}}
    speeds: dict[str, list[float]] = {v: [] for v in arms}
    runtimes = {}
    for _ in tqdm(range(args.rounds), desc=f"{name} timing", leave=False):
        for variant, flatbuffer in arms.items():
            rate = measure.images_per_second(flatbuffer, vx, seconds=args.seconds)
            speeds[variant].append(rate["images_per_s"])
            runtimes[variant] = rate["runtime"]
    f32 = files["float32"]
    base = {**measure.sizes(f32), "images_per_s": float(np.median(speeds["float32"]))}
    rows = {}
    for variant, flatbuffer in arms.items():
        sizes = measure.sizes(flatbuffer)
        accuracy = measure.evaluate(flatbuffer, vx, vy)["accuracy"]
        speed = float(np.median(speeds[variant]))
        rows[variant] = {**sizes, "bytes_ratio": sizes["bytes"] / base["bytes"],
                         "gzip_ratio": sizes["gzip_bytes"] / base["gzip_bytes"],
                         "accuracy": accuracy, "accuracy_drop": reference - accuracy,
                         "images_per_s": speed, "speedup": speed / base["images_per_s"],
                         "images_per_s_rounds": speeds[variant], "runtime": runtimes[variant]}
    counts = measure.model_counts(model)
    return {"model": name, "options": MODELS[name], "params": counts["params"],
            "keras_accuracy": reference, "pruned_keras_accuracy": keras_accuracy(pruned_model, vx, vy),
            "variants": rows}


def verdicts(results: dict) -> dict:
    out = {}
    for name, r in results.items():
        v = r["variants"]
        out[name] = {
            "dynamic_int8_bytes": v["dynamic_int8"]["bytes_ratio"] <= TARGETS["int8_bytes"],
            "full_int8_bytes": v["full_int8"]["bytes_ratio"] <= TARGETS["int8_bytes"],
            "float16_bytes": v["float16"]["bytes_ratio"] <= TARGETS["float16_bytes"],
            "accuracy_drop": all(v[k]["accuracy_drop"] <= TARGETS["accuracy_drop"] for k in DENSE),
            "pruned90_dynamic_int8_gzip": v["pruned90_dynamic_int8"]["gzip_ratio"] <= TARGETS["pruned_gzip"],
        }
        if name in SPEED_MODELS:
            out[name]["full_int8_speedup"] = v["full_int8"]["speedup"] >= TARGETS["int8_speedup"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset directory (default: digits at 32x32, prepared here)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per model")
    parser.add_argument("--representative", type=int, default=200, help="full_int8 calibration images")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--seconds", type=float, default=0.6, help="timing window per variant and round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown} (known: {', '.join(MODELS)})")

    from deploy.measure import load_images
    from train.data import open_dataset

    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        data_dir = Path(args.data) if args.data else prepare_digits(Path(tmp) / "digits32")
        info = open_dataset(data_dir)
        size = info.image_size or 32
        data = (load_images(info, "train", size), load_images(info, "validation", size))
    results = {}
    for name in names:
        log.info("%s: training %d epochs", name, args.epochs)
        model = train(name, MODELS[name], data, args.epochs, args.seed)
        results[name] = measure_model(name, model, data, args)
    checks = verdicts(results)
    write_json(RESULTS, {"dataset": str(args.data or "digits 32x32"), "image_size": size,
                         "epochs": args.epochs, "rounds": args.rounds, "seconds": args.seconds,
                         "threads": 1, "clock": "thread CPU time", "targets": TARGETS,
                         "cpu": platform.processor() or platform.machine(),
                         "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
                         "models": results, "checks": checks})
    print(f"{'model':<15}{'variant':<29}{'bytes':>10}{'x f32':>7}{'gzip':>10}{'x f32':>7}"
          f"{'acc':>7}{'drop':>7}{'img/s':>9}{'x f32':>7}  runtime")
    for name, r in results.items():
        for variant, row in r["variants"].items():
            print(f"{name:<15}{variant:<29}{row['bytes']:>10}{row['bytes_ratio']:>7.3f}"
                  f"{row['gzip_bytes']:>10}{row['gzip_ratio']:>7.3f}{row['accuracy']:>7.3f}"
                  f"{row['accuracy_drop']:>+7.3f}{row['images_per_s']:>9.0f}{row['speedup']:>7.2f}"
                  f"  {row['runtime']}")
    print("\nchecks against the issue's targets (pruned90: accuracy without fine-tuning, bytes only):")
    for name, c in checks.items():
        print(f"  {name:<15}" + "  ".join(f"{k}={'ok' if ok else 'MISSED'}" for k, ok in c.items()))
    print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
