"""Masked vs dense training step time (target: masked step at most 1.1x the dense step).

Times compiled `train_on_batch` steps of the same model with a plain optimizer and with the masked
optimizer (90% global magnitude mask), interleaving repeats so machine load hits both alike.
Prints a table and writes JSON (bench/results/masked_step.json).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from common.atomic import write_json  # noqa: E402
from common.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.masked_step")
TARGET = 1.1
CASES = {"lenet_300_100": 28, "conv_small": 32, "resnet20": 32}


def _step_time(model, x, y, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - started) / steps


def measure(name: str, size: int, batch: int, steps: int, repeats: int, jit: bool,
            min_time: float = 0.0) -> dict:
    import keras

    from lottery.points.masked_training import apply_mask, masked_optimizer
    from lottery.prune.masks import global_magnitude_mask
    from lottery.prune.stats import prunable_weights
    from train.models import build_model

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)

    dense = build_model(name, num_classes=10, input_size=size)
    dense.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss="sparse_categorical_crossentropy", jit_compile=jit)
    masked = build_model(name, num_classes=10, input_size=size)
    mask = global_magnitude_mask(prunable_weights(masked), 0.9)
    apply_mask(masked, mask)
    masked.compile(optimizer=masked_optimizer(keras.optimizers.SGD(0.01, momentum=0.9),
                                              masked, mask),
                   loss="sparse_categorical_crossentropy", jit_compile=jit)
    for model in (dense, masked):  # trace and warm up outside the timing
        model.train_on_batch(x, y)
    # Each timing window lasts at least min_time: a 3 ms step timed 30 times was mostly noise.
    probe = min(_step_time(dense, x, y, 3), _step_time(masked, x, y, 3))
    steps = max(steps, math.ceil(min_time / probe))
    dense_times, masked_times = [], []
    for _ in range(repeats):
        dense_times.append(_step_time(dense, x, y, steps))
        masked_times.append(_step_time(masked, x, y, steps))
    d, m = float(np.median(dense_times)), float(np.median(masked_times))
    return {"model": name, "input": size, "batch": batch, "xla": jit, "steps": steps,
            "repeats": repeats, "dense_step_s": d,
            "masked_step_s": m,
            "ratio": m / d, "target": TARGET, "pass": m / d <= TARGET}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds each timing window lasts at least (more steps for fast models)")
    parser.add_argument("--xla", choices=("off", "on", "both"), default="both",
                        help="XLA compilation of both steps (Keras enables it on GPUs by default)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "masked_step.json")
    args = parser.parse_args(argv)
    setup_logging()
    rows = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.xla]
    for name in args.models.split(","):
        for jit in modes:
            log.info("timing %s (XLA %s)", name, "on" if jit else "off")
            rows.append(measure(name, CASES[name], args.batch, args.steps, args.repeats, jit,
                                args.min_time))
    print(f"{'model':<16}{'XLA':>4}{'dense ms/step':>15}{'masked ms/step':>16}{'ratio':>8}"
          f"  target <= {TARGET}")
    for r in rows:
        print(f"{r['model']:<16}{'on' if r['xla'] else 'off':>4}{r['dense_step_s'] * 1e3:>15.2f}"
              f"{r['masked_step_s'] * 1e3:>16.2f}{r['ratio']:>8.2f}  {'PASS' if r['pass'] else 'FAIL'}")
    write_json(args.out, {"cases": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
