"""What an elephas round costs the driver as workers grow: prints a table, writes
bench/results/elephas_scaling.json.

For 2, 4, 8, 16 workers (local Spark, the same model, a step or two per worker), the same round
two ways, alternating within one run:
- tree: `SparkDataParallel.run_round`, averaged on the executors (train.state_reduce);
- collect: `SparkDataParallel.reference_round`, the former way: every worker's state collected
  and averaged on the driver.
Per round: bytes the driver received (array bytes plus pickled reports) and the driver's peak
Python-side memory during the round beyond what it held before (tracemalloc: Python objects and
NumPy buffers). Figures are medians over the rounds, and ratios against the same path at the
smallest worker count. Target: the tree path flat within 10% from 2 to 16 workers. Not measured:
the driver's JVM (in local mode it also runs the executors), and the process's RSS (the allocator
reuses memory freed by earlier rounds, so a round's RSS growth says little). Round times are
reported but on a shared machine they mostly measure the other jobs.

The model is a wide MLP with Adam (weights and two moments: about 3 x 4 bytes per parameter);
--hidden 1830 gives MobileNetV2's 3.5M parameters (~42 MB of state, as in issue 14).

Usage: .venv/bin/python bench/elephas_scaling.py [--workers 2,4,8,16] [--hidden 1024]
       [--rounds 3] [--steps 1] [--master local[2]]
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import write_json  # noqa: E402
from common.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.elephas_scaling")
RESULTS = REPO / "bench" / "results" / "elephas_scaling.json"
FEATURES, CLASSES, BATCH = 64, 10, 8
COMPILE = {"loss": "sparse_categorical_crossentropy"}


def wide_mlp(hidden: int):
    import keras

    inputs = keras.Input((FEATURES,))
    x = keras.layers.Dense(hidden, activation="relu")(inputs)
    x = keras.layers.Dense(hidden, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(x))


def adam():
    import keras

    return keras.optimizers.Adam(1e-3)


def synthetic_dataset(shard_files, worker_index, num_workers, seed):
    import tensorflow as tf

    rng = np.random.default_rng([seed, worker_index])
    x = rng.normal(size=(4 * BATCH, FEATURES)).astype("float32")
    y = rng.integers(CLASSES, size=4 * BATCH)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def _round(engine, path: str, state, round_index: int, steps: int) -> dict:
    weights, opt = state
    kwargs = dict(lr=None, steps=steps, round_index=round_index, seed=1, start_step=0)
    if path == "tree":
        result = engine.run_round(weights, opt, **kwargs)
    else:
        result = engine.reference_round(weights, opt, **kwargs)[0]
    m = result.metrics
    return {"bytes": m["driver_bytes_received"], "peak": m["driver_peak_bytes"],
            "round_s": m["round_s"], "spark_s": m["spark_s"],
            "arrays": result.weights + result.optimizer_state}


def measure(spark, workers: int, hidden: int, rounds: int, steps: int) -> dict:
    from train.elephas_engine import SparkDataParallel

    engine = SparkDataParallel(spark, functools.partial(wide_mlp, hidden), adam, COMPILE,
                               synthetic_dataset, workers, model_key=f"bench-mlp-{hidden}")
    state = engine.initial_state()
    state_bytes = sum(a.nbytes for a in state[0] + state[1])
    _round(engine, "tree", state, 0, steps)  # warm-up: every Python worker builds the model
    runs = {"tree": [], "collect": []}
    for r in tqdm(range(rounds), desc=f"{workers} workers", unit="round"):
        order = ("tree", "collect") if r % 2 == 0 else ("collect", "tree")
        for path in order:
            runs[path].append(_round(engine, path, state, 0, steps))
    engine.close()
    # Same inputs, same round: the two paths must agree (train/state_reduce.py's tolerance).
    diff = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
               for a, b in zip(runs["tree"][0]["arrays"], runs["collect"][0]["arrays"]))
    out = {"workers": workers, "state_bytes": state_bytes, "max_abs_difference": diff}
    for path, rs in runs.items():
        out[path] = {key: statistics.median(r[key] for r in rs)
                     for key in ("bytes", "peak", "round_s", "spark_s")}
        out[path]["runs"] = [{k: v for k, v in r.items() if k != "arrays"} for r in rs]
    return out


def _mib(n) -> str:
    return f"{n / 2**20:8.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="2,4,8,16")
    parser.add_argument("--hidden", type=int, default=1024, help="units of the two hidden layers")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per path and worker count")
    parser.add_argument("--steps", type=int, default=1, help="training steps per worker and round")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    setup_logging()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from common.spark import get_spark

    spark = get_spark("bench-elephas-scaling", args.master, conf={
        "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": args.driver_memory})
    counts = [int(w) for w in args.workers.split(",")]
    t0 = time.perf_counter()
    rows = [measure(spark, n, args.hidden, args.rounds, args.steps) for n in counts]
    spark.stop()

    first = rows[0]
    header = (f"{'workers':>7} | {'received MiB':^19} | {'driver peak MiB':^19} | "
              f"{'round s':^13} | {'vs ' + str(counts[0]) + ' workers':^29}")
    print(f"state {first['state_bytes'] / 2**20:.1f} MiB (MLP hidden={args.hidden}, Adam); "
          f"median of {args.rounds} rounds per cell; master {args.master}; shared machine")
    print(header)
    print(f"{'':>7} | {'tree':>8} {'collect':>10} | {'tree':>8} {'collect':>10} | "
          f"{'tree':>5} {'collect':>7} | {'bytes':>5} {'peak':>5} {'old bytes':>9} {'old peak':>8}")
    for row in rows:
        t, c = row["tree"], row["collect"]
        row["ratios"] = {
            "tree_bytes": t["bytes"] / first["tree"]["bytes"],
            "tree_peak": t["peak"] / first["tree"]["peak"],
            "collect_bytes": c["bytes"] / first["collect"]["bytes"],
            "collect_peak": c["peak"] / first["collect"]["peak"],
            "collect_over_tree_bytes": c["bytes"] / t["bytes"],
            "collect_over_tree_peak": c["peak"] / t["peak"],
        }
        q = row["ratios"]
        print(f"{row['workers']:>7} | {_mib(t['bytes'])} {_mib(c['bytes']):>10} | "
              f"{_mib(t['peak'])} {_mib(c['peak']):>10} | {t['round_s']:5.1f} {c['round_s']:7.1f} | "
              f"{q['tree_bytes']:5.2f} {q['tree_peak']:5.2f} {q['collect_bytes']:9.2f} "
              f"{q['collect_peak']:8.2f}")
    spread = {key: max(r["tree"][key] for r in rows) / min(r["tree"][key] for r in rows)
              for key in ("bytes", "peak")}
    met = all(v <= 1.10 for v in spread.values())
    print(f"tree path, max/min over {counts[0]}-{counts[-1]} workers: bytes {spread['bytes']:.3f}, "
          f"peak {spread['peak']:.3f} (target <= 1.10: {'met' if met else 'NOT met'}); "
          f"largest |tree - collect| {max(r['max_abs_difference'] for r in rows):.3g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {
        "benchmark": "elephas_scaling", "hidden": args.hidden, "optimizer": "adam",
        "rounds": args.rounds, "steps": args.steps, "master": args.master,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average": os.getloadavg(), "note": "shared with other jobs"},
        "rows": rows, "tree_spread": spread, "target_met": met,
        "wall_s": time.perf_counter() - t0})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
