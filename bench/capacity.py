"""A capacity plan: measured per-core figures and stated per-GPU figures -> wall times and costs.

Projects, for the product's three cluster jobs:
  1. ImageNet ETL (1,281,167 + 50,000 images) on N nodes of C cores, at 64 px and at 224 px;
  2. 90 epochs of MobileNetV2 on 20 nodes x 4 GPUs: Elephas with epoch averaging, Elephas with
     K-step averaging, and tf.distribute `multiworker`;
  3. a lottery grid of M masks x R rewinds x replicates on 80 GPUs.

Every input is a flag (--name VALUE) and is printed with its source: a flag, a bench result
(bench/results/*.json of etl_throughput, train_throughput, grid_scaling), a quick measurement on
this machine (ETL with etl.images.process_image on etl.samples photos; tf.data with
train.data.make_dataset over a small real dataset; driver-side evaluation with the registry's
MobileNetV2), a README figure, a cited public figure, or an ASSUMPTION the user should replace.
Every result is printed beside its formula with the numbers put in, so a user can check it or
redo it with another figure. Writes bench/results/capacity.json; --markdown prints the tables as
Markdown for HowToRun.md.

    .venv/bin/python bench/capacity.py                       # measure what no result file gives
    .venv/bin/python bench/capacity.py --gpu-train-ips 610 --gpu-infer-ips 5400   # V100 instead
    .venv/bin/python bench/capacity.py --no-measure ...      # only flags, results and stated figures
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.atomic import write_json  # noqa: E402  (after the sys.path set-up)
from train.state_reduce import MAX_FAN_IN, tree_shape  # noqa: E402  (NumPy only)

RESULTS = REPO / "bench" / "results"
DLE = ("NVIDIA DeepLearningExamples, TensorFlow2/Classification/ConvNets/efficientnet_v1/README.md "
       "(tensorflow:21.09-tf2-py3, DGX A100 80GB)")
PROXY = ("EfficientNet-B0 (390 M multiply-adds, the same inverted-residual blocks) stands in for "
         "MobileNetV2 (300 M): ASSUMPTION that MobileNetV2 is at least as fast; replace with your own")


@dataclasses.dataclass
class Figure:
    name: str
    unit: str
    help: str
    default: float | None = None       # a stated value: README, cited or assumption
    source: str = ""                   # where the default comes from
    measure: str | None = None         # key of MEASURES, when this machine can measure it
    results: tuple[tuple[str, ...], ...] = ()   # (file, key, ...) in bench/results; first found wins


FIGURES = [
    # -- measured per core on the development machine ---------------------------------------------
    Figure("etl_64_per_core", "img/s/core", "ETL images per CPU-second at fixed:64",
           measure="etl:fixed:64",
           results=(("etl_throughput.json", "case", "process_image fixed:64", "images_per_cpu_s"),)),
    Figure("etl_224_per_core", "img/s/core", "ETL images per CPU-second at center:224",
           measure="etl:center:224",
           results=(("etl_throughput.json", "case", "process_image center:224", "images_per_cpu_s"),)),
    Figure("spark_etl_overhead", "fraction", "Spark job's extra CPU per image over the same functions "
           "in one process", 0.027, "README performance table (etl_throughput.py, +2.7% marginal CPU)"),
    Figure("tfdata_224_per_core", "img/s/core", "tf.data training pipeline (make_dataset, crop_flip) "
           "images per CPU-second at 224 px", measure="tfdata"),
    Figure("driver_eval_per_core", "img/s/core", "MobileNetV2 224 px inference on the elephas driver's "
           "CPU (it sees no GPU), images per CPU-second", measure="eval"),
    Figure("elephas_round_fixed_s", "s", "Elephas fixed cost per round (scheduling, broadcast, collect, "
           "averaging) without the state's transfer time", 0.85,
           "README performance table (train_throughput.py, 2 workers, small model)",
           results=(("train_throughput.json", "c_elephas", "round_fixed_cost_s"),)),
    Figure("grid_overhead_per_point_s", "s", "grid scheduler overhead per point", 0.010,
           "README performance table (grid_scaling.py, 4 ranks)",
           results=(("grid_scaling.json", "targets", "max_overhead_per_point_s"),)),
    Figure("grid_efficiency", "fraction", "grid parallel efficiency against the ideal longest-first "
           "schedule", 0.957, "README performance table (grid_scaling.py, 4 ranks, dynamic)",
           results=(("cluster_sim.json", "targets", "efficiency_fair"),  # 80 ranks, simulated
                    ("grid_scaling.json", "targets", "efficiency_at_4_ranks_dynamic"))),
    # -- stated per-GPU figures ----------------------------------------------------------------------
    Figure("gpu_train_ips", "img/s/GPU", "training images/s per GPU, 224 px, mixed precision",
           20647 / 8, f"cited: 20,647 img/s on 8 x A100 80GB, EfficientNet-B0 AMP training, {DLE}; {PROXY}"),
    Figure("gpu_infer_ips", "img/s/GPU", "evaluation images/s per GPU, 224 px, float16", 9730,
           f"cited: 9,729.85 img/s, EfficientNet-B0 FP16 inference, batch 1024, 1 x A100 80GB, {DLE}; {PROXY}"),
    Figure("params", "weights", "MobileNetV2 1.0/224 parameters", 3.47e6,
           "cited: 3.47 M, tensorflow/models research/slim/nets/mobilenet/README.md"),
    Figure("optimizer_slots", "copies", "optimizer slots per weight (SGD momentum 1, Adam 2)", 1,
           "bigticket's default optimizer, SGD with momentum"),
    # -- the cluster and its prices: ASSUMPTIONS ---------------------------------------------------
    Figure("nodes", "nodes", "nodes", 20, "the target: 20 nodes x 4 GPUs"),
    Figure("gpus_per_node", "GPUs", "GPUs per node", 4, "the target: 20 nodes x 4 GPUs"),
    Figure("cores_per_node", "cores", "CPU cores per node (ETL, tf.data, driver)", 32, "ASSUMPTION"),
    Figure("cpus_per_grid_rank", "cores", "cores per grid rank", 8, "slurm/lottery_mpi.sbatch --cpus-per-task"),
    Figure("batch_per_gpu", "images", "batch size per GPU", 128, "ASSUMPTION"),
    Figure("epochs", "epochs", "dense training epochs", 90, "the target"),
    Figure("averaging_k", "steps", "K of K-step averaging", 100, "ASSUMPTION (HowToRun's example)"),
    Figure("driver_states_per_round", "states", "states the elephas driver receives per round (the "
           "workers' states are averaged on the executors; a driver that collected every worker's "
           "state would receive nodes x gpus_per_node)", 1,
           "train/state_reduce.py: the driver collects the one averaged state"),
    Figure("reduce_max_fan_in", "inputs", "largest fan-in of the executors' averaging tree",
           MAX_FAN_IN, "train/state_reduce.py MAX_FAN_IN"),
    Figure("tree_level_s", "s", "Spark's fixed cost of one level (shuffle stage) of the averaging "
           "tree, beyond the round's fixed cost", 0.1, "ASSUMPTION"),
    Figure("driver_gbps", "Gbit/s", "the elephas driver's network", 25, "ASSUMPTION"),
    Figure("interconnect_gbps", "Gbit/s", "per-GPU share of the inter-node network for all-reduce",
           100, "ASSUMPTION (one 100 Gb/s link per GPU, e.g. HDR InfiniBand)"),
    Figure("allreduce_latency_s", "s", "per-hop latency of a ring all-reduce", 20e-6, "ASSUMPTION"),
    Figure("allreduce_overlap", "fraction", "share of the all-reduce hidden behind compute", 0.0,
           "ASSUMPTION (conservative: none)"),
    Figure("fs_gbps", "Gbit/s", "shared file system read bandwidth for the ETL's input", 40, "ASSUMPTION"),
    Figure("jpeg_kb", "kB", "mean ImageNet source JPEG", 110, "ImageNet train: ~140 GB / 1.28 M files"),
    Figure("spark_startup_s", "s", "Spark standalone start-up and job set-up", 60, "ASSUMPTION"),
    Figure("train_images", "images", "ImageNet train split", 1281167, "ILSVRC-2012"),
    Figure("val_images", "images", "ImageNet validation split", 50000, "ILSVRC-2012"),
    Figure("grid_masks", "masks", "grid: masks (sparsities x controls)", 10, "ASSUMPTION"),
    Figure("grid_rewinds", "rewinds", "grid: rewind points", 4, "ASSUMPTION"),
    Figure("grid_replicates", "seeds", "grid: replicates", 2, "ASSUMPTION"),
    Figure("grid_epochs", "epochs", "grid: retraining epochs per point", 90, "same as the dense run"),
    Figure("grid_gpus", "GPUs", "grid: GPUs (one rank each)", 80, "the target"),
    Figure("gpu_hour_usd", "USD", "price of one GPU-hour", 2.0, "ASSUMPTION: replace with your rate"),
    Figure("cpu_node_hour_usd", "USD", "price of one CPU node-hour (cores_per_node cores)", 1.5,
           "ASSUMPTION: replace with your rate"),
]
BY_NAME = {f.name: f for f in FIGURES}


# -- measurements -------------------------------------------------------------------------------

def measure_etl(policy_text: str, images: int = 60) -> float:
    """Images per CPU-second of etl.images.process_image on ImageNet-sized sample photos."""
    from etl.images import ResizePolicy, process_image
    from etl.samples import photo_variants

    payloads = list(photo_variants(images, seed=0))
    policy = ResizePolicy.parse(policy_text)
    process_image(payloads[0], policy)  # warm-up
    cpu = time.process_time()
    for payload in payloads:
        process_image(payload, policy)
    return images / (time.process_time() - cpu)


def measure_tfdata(work: Path, images: int = 256, batch: int = 32) -> float:
    """Images per CPU-second of train.data.make_dataset (training, crop_flip, 224 px) over shards
    the ETL job wrote from ImageNet-sized photos (local Spark)."""
    from bench.etl_throughput import build_tree
    from common.spark import get_spark
    from etl.job import prepare
    from etl.settings import EtlSettings
    from train.data import make_dataset, open_dataset

    tree, out = work / "photos", work / "center224"
    build_tree(tree, images, seed=0)
    spark = get_spark("bench-capacity", "local[2]", {"spark.ui.enabled": "false"})
    prepare(EtlSettings(source="imagenet-folder", input=str(tree), out=str(out), resize="center:224",
                        format="tfrecord", train_shards=2, validation_shards=1), spark=spark)
    spark.stop()
    info = open_dataset(out)
    rates = []
    for epoch in range(3):  # the first pass warms up (tracing, file cache)
        ds = make_dataset(info, "train", batch_size=batch, training=True, input_size=224,
                          fmt="tfrecord", epoch=epoch, cache=False)
        count, cpu = 0, time.process_time()
        for x, _ in ds:
            count += int(x.shape[0])
        rates.append(count / (time.process_time() - cpu))
    return max(rates[1:])


def measure_eval(images: int = 64, batch: int = 32) -> float:
    """Images per CPU-second of MobileNetV2 (the registry's, 1000 classes) predicting at 224 px."""
    import numpy as np

    from train.models import build_model

    model = build_model("mobilenet_v2", 1000, 224)
    x = np.random.default_rng(0).random((images, 224, 224, 3), dtype=np.float32) * 255
    model.predict(x[:batch], batch_size=batch, verbose=0)
    cpu = time.process_time()
    model.predict(x, batch_size=batch, verbose=0)
    return images / (time.process_time() - cpu)


def _from_results(path: tuple[str, ...]) -> float | None:
    file = RESULTS / path[0]
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        if path[1] == "case":  # etl_throughput: a list of cases by name
            case = next(c for c in data["cases"] if c["name"] == path[2])
            return float(case[path[3]])
        for key in path[1:]:
            data = data[key]
        return float(data)
    except (KeyError, StopIteration, TypeError, ValueError):
        return None


def resolve(args, work: Path) -> dict[str, dict]:
    """Every figure's value and source, in the order: flag, bench result, measurement, stated."""
    values: dict[str, dict] = {}
    for f in FIGURES:
        flag = getattr(args, f.name)
        if flag is not None:
            values[f.name] = {"value": flag, "source": "flag"}
            continue
        found = next(((path, value) for path in f.results
                      if (value := _from_results(path)) is not None), None)
        if found is not None:
            values[f.name] = {"value": found[1], "source": f"bench/results/{found[0][0]}"}
            continue
        if f.measure and not args.no_measure:
            kind, _, detail = f.measure.partition(":")
            started = time.perf_counter()
            if kind == "etl":
                value = measure_etl(detail)
            else:
                value = measure_tfdata(work) if kind == "tfdata" else measure_eval()
            values[f.name] = {"value": value, "source": f"measured here ({os.cpu_count()} CPUs, "
                              f"{time.perf_counter() - started:.0f} s; a shared machine)"}
            continue
        if f.default is None:
            raise SystemExit(f"--{f.name.replace('_', '-')}: no bench result and --no-measure: "
                             f"give the figure ({f.help}, {f.unit})")
        values[f.name] = {"value": f.default, "source": f.source}
    for name, v in values.items():
        v["unit"] = BY_NAME[name].unit
    return values


# -- the plan -----------------------------------------------------------------------------------

class Plan:
    """Results with the formula that gave each, its numbers put in."""

    def __init__(self, inputs: dict[str, float]):
        self.v = dict(inputs)
        self.rows: list[dict] = []

    def calc(self, scenario: str, name: str, unit: str, formula: str, value: float) -> float:
        shown = re.sub(r"\b[a-z][a-z0-9_]*\b",
                       lambda m: _fmt(self.v[m.group()]) if m.group() in self.v else m.group(), formula)
        self.rows.append({"scenario": scenario, "name": name, "value": value, "unit": unit,
                          "formula": formula, "with_inputs": shown})
        self.v[name] = value
        return value


def _fmt(x: float) -> str:
    if x is None:
        return "None"
    if x == int(x) and abs(x) >= 1:
        return f"{int(x):,}"
    return f"{x:.4g}"


def plan(v: dict[str, float]) -> list[dict]:
    p = Plan(v)
    v = p.v

    # 1. ETL of ImageNet on N nodes x C cores, CPU- or file-system-bound.
    s = "1 ETL"
    p.calc(s, "etl_images", "images", "train_images + val_images", v["train_images"] + v["val_images"])
    p.calc(s, "etl_read_s", "s", "etl_images * jpeg_kb * 8e3 / (fs_gbps * 1e9)",
           v["etl_images"] * v["jpeg_kb"] * 8e3 / (v["fs_gbps"] * 1e9))
    for px in ("64", "224"):
        per_core = v[f"etl_{px}_per_core"]
        cpu_s = p.calc(s, f"etl_{px}_cpu_s", "s",
                       f"etl_images * (1 + spark_etl_overhead) / (nodes * cores_per_node * etl_{px}_per_core)",
                       v["etl_images"] * (1 + v["spark_etl_overhead"]) / (v["nodes"] * v["cores_per_node"] * per_core))
        wall = p.calc(s, f"etl_{px}_wall_h", "h", f"(max(etl_{px}_cpu_s, etl_read_s) + spark_startup_s) / 3600",
                      (max(cpu_s, v["etl_read_s"]) + v["spark_startup_s"]) / 3600)
        p.calc(s, f"etl_{px}_cost_usd", "USD", f"nodes * etl_{px}_wall_h * cpu_node_hour_usd",
               v["nodes"] * wall * v["cpu_node_hour_usd"])

    # 2. Dense MobileNetV2 training on nodes x gpus_per_node GPUs.
    s = "2 dense"
    workers = p.calc(s, "workers", "GPUs", "nodes * gpus_per_node", v["nodes"] * v["gpus_per_node"])
    rate = p.calc(s, "gpu_rate", "img/s/GPU",
                  "min(gpu_train_ips, cores_per_node * tfdata_224_per_core / gpus_per_node)",
                  min(v["gpu_train_ips"], v["cores_per_node"] * v["tfdata_224_per_core"] / v["gpus_per_node"]))
    compute = p.calc(s, "epoch_compute_s", "s", "train_images / (workers * gpu_rate)",
                     v["train_images"] / (workers * rate))
    steps = p.calc(s, "steps_per_epoch", "steps", "ceil(train_images / (workers * batch_per_gpu))",
                   math.ceil(v["train_images"] / (workers * v["batch_per_gpu"])))
    state_mb = p.calc(s, "state_mb", "MB", "params * 4 * (1 + optimizer_slots) / 1e6",
                      v["params"] * 4 * (1 + v["optimizer_slots"]) / 1e6)
    fan_in, per_level = tree_shape(int(workers), int(v["reduce_max_fan_in"]))
    p.calc(s, "tree_fan_in", "inputs", "tree_shape(workers, reduce_max_fan_in) fan-in", fan_in)
    levels = p.calc(s, "tree_levels", "levels", "tree_shape(workers, reduce_max_fan_in) levels", len(per_level))
    # A merge receives fan-in partial sums, float64 (twice the state) above the leaves: bounded here.
    tree_s = p.calc(s, "tree_reduce_s", "s",
                    "tree_levels * (tree_level_s + tree_fan_in * 2 * state_mb * 8e6 / (interconnect_gbps * 1e9))",
                    levels * (v["tree_level_s"] + fan_in * 2 * state_mb * 8e6 / (v["interconnect_gbps"] * 1e9)))
    round_s = p.calc(s, "elephas_round_s", "s",
                     "elephas_round_fixed_s + tree_reduce_s"
                     " + state_mb * 8e6 * (1 + driver_states_per_round) / (driver_gbps * 1e9)",
                     v["elephas_round_fixed_s"] + tree_s + state_mb * 8e6 * (1 + v["driver_states_per_round"])
                     / (v["driver_gbps"] * 1e9))
    driver_eval = p.calc(s, "driver_eval_s", "s", "val_images / (driver_eval_per_core * cores_per_node)",
                         v["val_images"] / (v["driver_eval_per_core"] * v["cores_per_node"]))
    for label, rounds_formula, rounds in (
            ("epoch", "1", 1),
            ("ksteps", "ceil(steps_per_epoch / averaging_k)", math.ceil(steps / v["averaging_k"]))):
        r = p.calc(s, f"elephas_{label}_rounds_per_epoch", "rounds", rounds_formula, rounds)
        epoch = p.calc(s, f"elephas_{label}_epoch_s", "s",
                       f"epoch_compute_s + elephas_{label}_rounds_per_epoch * elephas_round_s + driver_eval_s",
                       compute + r * round_s + driver_eval)
        wall = p.calc(s, f"elephas_{label}_wall_h", "h", f"epochs * elephas_{label}_epoch_s / 3600",
                      v["epochs"] * epoch / 3600)
        p.calc(s, f"elephas_{label}_cost_usd", "USD", f"workers * elephas_{label}_wall_h * gpu_hour_usd",
               workers * wall * v["gpu_hour_usd"])
    allreduce = p.calc(s, "allreduce_s", "s",
                       "2 * (workers - 1) / workers * params * 4 * 8 / (interconnect_gbps * 1e9)"
                       " + 2 * (workers - 1) * allreduce_latency_s",
                       2 * (workers - 1) / workers * v["params"] * 32 / (v["interconnect_gbps"] * 1e9)
                       + 2 * (workers - 1) * v["allreduce_latency_s"])
    step = p.calc(s, "multiworker_step_s", "s", "batch_per_gpu / gpu_rate + (1 - allreduce_overlap) * allreduce_s",
                  v["batch_per_gpu"] / rate + (1 - v["allreduce_overlap"]) * allreduce)
    # Every multiworker worker scores the whole validation split itself (train.local_engine).
    epoch = p.calc(s, "multiworker_epoch_s", "s", "steps_per_epoch * multiworker_step_s + val_images / gpu_infer_ips",
                   steps * step + v["val_images"] / v["gpu_infer_ips"])
    wall = p.calc(s, "multiworker_wall_h", "h", "epochs * multiworker_epoch_s / 3600", v["epochs"] * epoch / 3600)
    p.calc(s, "multiworker_cost_usd", "USD", "workers * multiworker_wall_h * gpu_hour_usd",
           workers * wall * v["gpu_hour_usd"])

    # 3. The lottery grid: one point per GPU at a time, longest first.
    s = "3 grid"
    points = p.calc(s, "grid_points", "points", "grid_masks * grid_rewinds * grid_replicates",
                    v["grid_masks"] * v["grid_rewinds"] * v["grid_replicates"])
    rate1 = p.calc(s, "grid_gpu_rate", "img/s/GPU", "min(gpu_train_ips, cpus_per_grid_rank * tfdata_224_per_core)",
                   min(v["gpu_train_ips"], v["cpus_per_grid_rank"] * v["tfdata_224_per_core"]))
    point = p.calc(s, "grid_point_h", "h",
                   "(grid_epochs * (train_images / grid_gpu_rate + val_images / gpu_infer_ips)"
                   " + grid_overhead_per_point_s) / 3600",
                   (v["grid_epochs"] * (v["train_images"] / rate1 + v["val_images"] / v["gpu_infer_ips"])
                    + v["grid_overhead_per_point_s"]) / 3600)
    # Whole waves of equal points, or the measured efficiency against the ideal, whichever is worse.
    wall = p.calc(s, "grid_wall_h", "h",
                  "max(ceil(grid_points / grid_gpus) * grid_point_h,"
                  " grid_points * grid_point_h / (grid_gpus * grid_efficiency))",
                  max(math.ceil(points / v["grid_gpus"]) * point,
                      points * point / (v["grid_gpus"] * v["grid_efficiency"])))
    p.calc(s, "grid_cost_usd", "USD", "grid_gpus * grid_wall_h * gpu_hour_usd",
           v["grid_gpus"] * wall * v["gpu_hour_usd"])
    return p.rows


# -- output ---------------------------------------------------------------------------------------

def print_tables(inputs: dict[str, dict], rows: list[dict], markdown: bool) -> None:
    if markdown:
        print("| input | value | unit | source |\n|---|---|---|---|")
        for name, v in inputs.items():
            print(f"| `--{name.replace('_', '-')}` | {_fmt(v['value'])} | {v['unit']} | {v['source']} |")
        print("\n| scenario | result | value | unit | formula (with the inputs) |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['scenario']} | `{r['name']}` | {_fmt(r['value'])} | {r['unit']} | "
                  f"`{r['formula']}` = {r['with_inputs']} |")
        return
    print("inputs")
    for name, v in inputs.items():
        print(f"  --{name.replace('_', '-'):<28} {_fmt(v['value']):>12} {v['unit']:<11} {v['source']}")
    print("\nplan")
    for r in rows:
        print(f"  [{r['scenario']}] {r['name']} = {_fmt(r['value'])} {r['unit']}")
        print(f"      {r['formula']}")
        print(f"      = {r['with_inputs']}")
    summary = {r["name"]: r["value"] for r in rows}
    print("\nsummary                          wall (h)     cost (USD)")
    for label, key in (("ETL 64 px", "etl_64"), ("ETL 224 px", "etl_224"),
                       ("Elephas, epoch averaging", "elephas_epoch"),
                       ("Elephas, K-step averaging", "elephas_ksteps"),
                       ("multiworker", "multiworker"), ("grid", "grid")):
        print(f"  {label:<30} {_fmt(summary[key + '_wall_h']):>10} {summary[key + '_cost_usd']:>14,.0f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in FIGURES:
        stated = f" (default: {_fmt(f.default)}, {f.source})" if f.default is not None else ""
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=float, default=None,
                            metavar=f.unit.upper().replace("/", "_"), help=f"{f.help}{stated}")
    parser.add_argument("--no-measure", action="store_true",
                        help="never measure here: figures come from flags, bench results or defaults")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--out", type=Path, default=RESULTS / "capacity.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("nodes", "gpus_per_node", "cores_per_node", "grid_gpus", "batch_per_gpu", "averaging_k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bigticket-capacity-") as work:
        inputs = resolve(args, Path(work))
    rows = plan({k: v["value"] for k, v in inputs.items()})
    print_tables(inputs, rows, args.markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"benchmark": "capacity",
                          "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "inputs": inputs, "plan": rows,
                          "notes": "Projections, not measurements: each result is its formula over "
                                   "the inputs; replace any input with --<name>."})
    if not args.markdown:
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
