"""Inference speed-up of compacted (channel-pruned) models vs dense on CPU, next to the FLOP reduction.

Target: at channel ratio 0.5 the measured speed-up is at least 0.7x the FLOP reduction ratio
(dense FLOPs / compact FLOPs). For each model and ratio (criterion l1, layer scope) the dense and
the compacted models are timed in the same run, interleaved (the order rotates each repeat),
`--repeats` times; each measurement is the median step time of a `--seconds` window and the
medians of the repeats are compared.

`--variants` compares the options that decide how close the speed-up comes to the FLOP ratio,
each a '+'-joined set of: `fold` (BatchNorm folded into the convolution before it, in BOTH arms:
the Keras inference export), `litert` (both arms exported to LiteRT and run by TensorFlow's
interpreter with XNNPACK, the usual CPU deployment: its converter folds BatchNorm and fuses bias
and activation into each convolution; lottery.points.inference), `xla` (both arms' Keras predict steps
XLA-compiled), `rN` (select_channels round_to=N: the compact arm keeps multiples of N channels
per group; its FLOPs, and so the FLOP ratio, are those of the model actually timed). `plain` is
none of them. `--threads N` pins TF's intra-op threads and the LiteRT interpreter's threads (both
arms alike; 0 = every core). `xla` is not in the default set: on this CPU it made every arm
slower (MobileNetV2 about 10x) and the ratio worse.

On a machine shared with other busy processes wall-clock rates say more about the neighbours than
the models: `--threads 1 --clock cpu` times images per CPU-second of one thread instead (both arms
alike), which is stable under load; the wall-clock figure on a quiet machine is the real one.

A per-layer-type FLOP split (conv / pointwise / depthwise / dense) comes with each row: when the
speed-up lags the FLOP ratio, it shows which kind of layer the remaining work sits in. 'lane x' is
the FLOP ratio with every layer's output channels rounded up to whole CPU vectors (`--lanes`, 16
floats with AVX-512): the work the kernels really do, so the speed-up the hardware allows; an
8-channel layer costs what a 16-channel one does. 's-u/lane' near 1 says the compaction delivers
all of it. `--explain` measures that lane granularity directly (3x3 conv rate by width).
Prints a table and writes JSON (bench/results/compaction_speedup.json).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common.atomic import write_json  # noqa: E402
from common.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.compaction_speedup")
TARGET = 0.7        # speed-up / FLOP ratio at TARGET_RATIO
TARGET_RATIO = 0.5


def flops_by_kind(model) -> dict[str, int]:
    """FLOPs split by layer kind: conv (k x k > 1), pointwise (1x1 conv), depthwise, dense."""
    import keras

    from lottery.prune.compaction import layer_flops
    from lottery.prune.keras_graph import walk_calls

    out = {"conv": 0, "pointwise": 0, "depthwise": 0, "dense": 0}
    for layer, ins, outs in walk_calls(model):
        f = layer_flops(layer, ins, outs)
        if not f:
            continue
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            out["depthwise"] += f
        elif isinstance(layer, keras.layers.Dense):
            out["dense"] += f
        elif tuple(layer.kernel_size) == (1, 1):
            out["pointwise"] += f
        else:
            out["conv"] += f
    return out


def vector_lanes() -> int:
    """float32 lanes of this CPU's widest vector unit that XNNPACK uses (16 AVX-512, 8 AVX, else 4)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux
        return 4
    return 16 if "avx512f" in flags else 8 if "avx" in flags else 4


def lane_padded_flops(model, lanes: int) -> int:
    """FLOPs with each layer's output channels rounded up to whole vectors of `lanes` floats.

    What CPU kernels actually compute: XNNPACK's convolution and matrix kernels produce output
    channels a vector at a time, so an 8-channel layer costs what a 16-channel one does on a
    16-lane CPU. The speed-up can follow the ratio of these counts at best, not the plain FLOP ratio.
    """
    from lottery.prune.compaction import layer_flops
    from lottery.prune.keras_graph import walk_calls

    total = 0
    for layer, ins, outs in walk_calls(model):
        f = layer_flops(layer, ins, outs)
        if f:
            channels = int(outs[0].shape[-1])
            total += f * (-(-channels // lanes) * lanes) // channels
    return int(total)


def conv_efficiency(batch: int, seconds: float, widths=(4, 8, 16, 32, 64), sizes=(32, 16, 8),
                    clock: str = "wall", runtime: str = "keras", threads: int = 0) -> list[dict]:
    """Multiply-adds per second of a stack of 3x3 convolutions (+BN+ReLU) by width and feature-map size.

    Why the speed-up trails the FLOP ratio: below the CPU's vector width (16 floats with AVX-512)
    a channels-last convolution leaves lanes idle (XNNPACK's AVX-512 kernels compute output
    channels 16 at a time, so an 8-channel layer runs at half their rate), and BatchNorm / ReLU /
    Add (not in the FLOP count) cost the same per element at any width, so narrow layers run at a
    fraction of the rate. `runtime` "keras" (the compiled predict step) or "litert" (each stack
    exported as lottery.points.inference.LiteRTModel; `threads` its interpreter threads, 0 every core).
    """
    import keras

    from lottery.points.inference import LiteRTModel, inference_rate
    from lottery.prune.compaction import model_flops

    L = keras.layers
    rows = []
    for size in sizes:
        for width in widths:
            for bn in (False, True):
                inp = keras.Input((size, size, width))
                x = inp
                for _ in range(4):
                    x = L.Conv2D(width, 3, padding="same", use_bias=False)(x)
                    if bn:
                        x = L.ReLU()(L.BatchNormalization()(x))
                model = keras.Model(inp, x)
                timed = LiteRTModel(model, batch) if runtime == "litert" else model
                rate = inference_rate(timed, batch_size=batch, seconds=seconds, stat="median", clock=clock,
                                      threads=threads or None)
                rows.append({"runtime": runtime, "size": size, "width": width, "bn_relu": bn,
                             "gmac_s": rate * model_flops(model) / 1e9})
    return rows


def parse_variant(text: str) -> dict:
    """'fold+r16+xla' -> {"name", "fold", "xla", "litert", "round_to"}; ValueError naming a bad part."""
    out = {"name": text, "fold": False, "xla": False, "litert": False, "round_to": 1}
    for part in filter(None, text.split("+")):
        if part == "plain":
            continue
        if part in ("fold", "xla", "litert"):
            out[part] = True
        elif part.startswith("r") and part[1:].isdigit() and int(part[1:]) >= 1:
            out["round_to"] = int(part[1:])
        else:
            raise ValueError(f"--variants: {part!r} in {text!r} is not plain, fold, xla, litert or "
                             f"rN (N >= 1)")
    if out["xla"] and out["litert"]:
        raise ValueError(f"--variants: {text!r}: xla compiles the Keras step, litert replaces it")
    return out


def _export(model, fold: bool, xla: bool, litert: bool, batch: int):
    """The model as it would be deployed under (fold, xla, litert): its own copy, so each arm
    has its own step."""
    import keras

    from lottery.points.inference import LiteRTModel
    from lottery.prune.compaction import fold_batchnorm

    if litert:
        return LiteRTModel(fold_batchnorm(model) if fold else model, batch)
    if fold:
        out = fold_batchnorm(model)
    else:
        out = keras.models.clone_model(model)
        out.set_weights(model.get_weights())
    out.compile(jit_compile=xla)   # predict_on_batch runs an XLA-compiled step when True
    return out


def measure(name: str, size: int, options: dict, ratios: list[float], variants: list[dict], batch: int,
            seconds: float, repeats: int, clock: str = "wall", threads: int = 0, lanes: int = 16) -> list[dict]:
    import keras

    from lottery.points.inference import inference_rate
    from lottery.prune.channel_masks import select_channels
    from lottery.prune.compaction import compact, model_cost
    from train.models import build_model

    keras.utils.set_random_seed(0)
    base = build_model(name, num_classes=10, input_size=size, **options)
    dense_cost = model_cost(base)
    dense_kinds = flops_by_kind(base)
    dense_lane_flops = lane_padded_flops(base, lanes)
    dense_arms = {(v["fold"], v["xla"], v["litert"]): None for v in variants}
    for key in dense_arms:
        dense_arms[key] = _export(base, *key, batch)
    rows = []
    for ratio in ratios:
        compacts, arms = {}, {("dense",) + k: m for k, m in dense_arms.items()}
        for v in variants:
            r = v["round_to"]
            if r not in compacts:
                small = compact(base, select_channels(base, "l1", ratio, scope="layer", round_to=r))
                compacts[r] = (small, model_cost(small), flops_by_kind(small), lane_padded_flops(small, lanes))
            key = ("compact", r, v["fold"], v["xla"], v["litert"])
            if key not in arms:
                arms[key] = _export(compacts[r][0], v["fold"], v["xla"], v["litert"], batch)
        keys = list(arms)
        rates: dict[tuple, list[float]] = {k: [] for k in keys}
        for rep in tqdm(range(repeats), desc=f"{name} {ratio:.0%}", unit="repeat", leave=False, disable=None):
            # Interleaved, order rotated: a burst of load from other processes hits every arm alike.
            for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
                rates[k].append(inference_rate(arms[k], batch_size=batch, seconds=seconds, stat="median",
                                               clock=clock, threads=threads or None))
        for v in variants:
            dk = ("dense", v["fold"], v["xla"], v["litert"])
            ck = ("compact", v["round_to"], v["fold"], v["xla"], v["litert"])
            d, c = float(np.median(rates[dk])), float(np.median(rates[ck]))
            _, small_cost, small_kinds, small_lane_flops = compacts[v["round_to"]]
            flop_ratio = dense_cost["flops"] / small_cost["flops"]
            lane_flop_ratio = dense_lane_flops / small_lane_flops
            row = {
                "model": name, "input": size, "options": options, "ratio": ratio, "criterion": "l1",
                "scope": "layer", "batch": batch, "clock": clock, "variant": v["name"], "fold": v["fold"],
                "xla": v["xla"],
                "litert": v["litert"],
                "round_to": v["round_to"], "dense": dense_cost, "compact": small_cost,
                "dense_flops_by_kind": dense_kinds, "compact_flops_by_kind": small_kinds,
                "flop_ratio": flop_ratio, "lanes": lanes, "lane_flop_ratio": lane_flop_ratio,
                "speedup_per_lane_flop_ratio": c / d / lane_flop_ratio,
                "param_ratio": dense_cost["params"] / small_cost["params"],
                "dense_images_s": d, "compact_images_s": c, "dense_images_s_all": rates[dk],
                "compact_images_s_all": rates[ck], "speedup": c / d, "speedup_per_flop_ratio": c / d / flop_ratio,
                # Median of the per-repeat ratios (each pair measured close in time): a check on the
                # ratio of medians when the load drifts during the run.
                "speedup_paired": float(np.median(np.divide(rates[ck], rates[dk]))),
            }
            if abs(ratio - TARGET_RATIO) < 1e-9:
                row["target"] = TARGET
                row["pass"] = row["speedup_per_flop_ratio"] >= TARGET
            log.info("%s ratio %.1f %s: %.0f -> %.0f img/s (x%.2f), FLOPs /%.2f", name, ratio, v["name"], d, c,
                     c / d, flop_ratio)
            rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'model':<14}{'ratio':>6}{'variant':>15}{'params dense->compact':>24}{'MFLOPs':>10}{'FLOP x':>8}"
            f"{'dense img/s':>13}"
            f"{'compact img/s':>15}{'speed-up':>10}{'paired':>8}{'s-u/FLOP':>10}{'lane x':>8}{'s-u/lane':>10}  target")
    lines = [head]
    for r in rows:
        verdict = "" if "pass" not in r else (f">= {r['target']} " + ("PASS" if r["pass"] else "FAIL"))
        params = f"{r['dense']['params']:,} -> {r['compact']['params']:,}"
        lines.append(f"{r['model']:<14}{r['ratio']:>6.1f}{r['variant']:>15}{params:>24}"
                     f"{r['compact']['flops'] / 1e6:>10.1f}{r['flop_ratio']:>8.2f}{r['dense_images_s']:>13.0f}"
                     f"{r['compact_images_s']:>15.0f}{r['speedup']:>10.2f}{r.get('speedup_paired', float('nan')):>8.2f}"
                     f"{r['speedup_per_flop_ratio']:>10.2f}{r['lane_flop_ratio']:>8.2f}"
                     f"{r['speedup_per_lane_flop_ratio']:>10.2f}  {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet20")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--mobilenet-size", type=int, default=96, help="MobileNetV2 input size (px)")
    parser.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier")
    parser.add_argument("--resnet-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="plain,fold,fold+r16,litert,litert+r16",
                        help="comma-separated option sets, each '+'-joined from fold, litert, xla, rN (or plain)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (the real speed, needs a quiet machine); cpu: process CPU "
                             "time, images per CPU-second (use with --threads 1 on a shared machine)")
    parser.add_argument("--threads", type=int, default=0,
                        help="TF intra-op and LiteRT interpreter threads for both arms (0: every core)")
    parser.add_argument("--lanes", type=int, default=0,
                        help="float32 vector lanes for the 'lane x' column "
                             "(0: this CPU's: 16 with AVX-512, 8 with AVX)")
    parser.add_argument("--explain", action="store_true",
                        help="also measure 3x3 conv multiply-adds/s by channel width (why speed-up < FLOP ratio)")
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. whether the machine was quiet)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compaction_speedup.json")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
        variants = [parse_variant(v) for v in args.variants.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.lanes < 0:
        parser.error("--lanes must be >= 0")
    lanes = args.lanes or vector_lanes()
    if args.threads:
        import tensorflow as tf

        # Must precede the first TF op. Inter-op 1 too: then one thread does all of a step's work,
        # so --clock cpu counts that work and no idle pool thread's spinning.
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    cases = {"mobilenet_v2": (args.mobilenet_size, {"alpha": args.alpha}),
             "resnet20": (args.resnet_size, {}), "resnet44": (args.resnet_size, {}),
             "resnet56": (args.resnet_size, {})}
    rows = []
    for name in args.models.split(","):
        if name not in cases:
            parser.error(f"--models: {name!r} is not one of {sorted(cases)}")
        size, options = cases[name]
        rows.extend(measure(name, size, options, ratios, variants, args.batch, args.seconds, args.repeats,
                            args.clock, args.threads, lanes))
    print(_table(rows))
    efficiency = []
    # In the runtimes the variants timed: the explanation is about the kernels that ran.
    for runtime in sorted({"litert" if v["litert"] else "keras" for v in variants}) if args.explain else ():
        rows_rt = conv_efficiency(args.batch, min(args.seconds, 0.5), clock=args.clock, runtime=runtime,
                                  threads=args.threads)
        efficiency += rows_rt
        print(f"\n3x3 conv stack in {runtime}, GMAC/s (conv only | conv+BN+ReLU)")
        print(f"{'size':>6}" + "".join(f"{'w=' + str(w):>16}" for w in sorted({e['width'] for e in rows_rt})))
        for size in sorted({e["size"] for e in rows_rt}, reverse=True):
            cells = {(e["width"], e["bn_relu"]): e["gmac_s"] for e in rows_rt if e["size"] == size}
            print(f"{size:>6}" + "".join(f"{cells[(w, False)]:>8.1f} |{cells[(w, True)]:>6.1f}"
                                         for w in sorted({w for w, _ in cells})))
    write_json(args.out, {
        "conv_efficiency": efficiency,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                    "note": args.note,
                    "platform": platform.platform()},
        "cases": rows,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
