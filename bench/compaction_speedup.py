"""Inference speed-up of compacted (channel-pruned) models vs dense on CPU, next to the FLOP reduction.

Issue 6 target: at channel ratio 0.5 the measured speed-up is at least 0.7x the FLOP reduction ratio
(dense FLOPs / compact FLOPs). For each model and ratio (criterion l1, layer scope) the dense and
the compacted model are timed in the same run, alternately, `--repeats` times; the medians are
compared. A per-layer-type FLOP split (conv / depthwise / dense) comes with each row: when the
speed-up lags the FLOP ratio, it shows which kind of layer the remaining work sits in (depthwise
and small 1x1 convolutions run far below peak on CPU, so their share predicts the gap).
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

    from lottery.compaction import layer_flops
    from lottery.structured import flat_nodes

    out = {"conv": 0, "pointwise": 0, "depthwise": 0, "dense": 0}
    for layer, ins, outs in flat_nodes(model):
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


def conv_efficiency(batch: int, seconds: float, widths=(4, 8, 16, 32, 64), sizes=(32, 16, 8)) -> list[dict]:
    """Multiply-adds per second of a stack of 3x3 convolutions (+BN+ReLU) by width and feature-map size.

    Why the speed-up trails the FLOP ratio: below the CPU's vector width (16 floats with AVX-512)
    a channels-last convolution leaves lanes idle, and BatchNorm / ReLU / Add (not in the FLOP
    count) cost the same per element at any width, so narrow layers run at a fraction of the rate.
    """
    import keras

    from lottery.compaction import inference_rate, model_flops

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
                rate = inference_rate(model, batch_size=batch, seconds=seconds)
                rows.append({"size": size, "width": width, "bn_relu": bn,
                             "gmac_s": rate * model_flops(model) / 1e9})
    return rows


def measure(name: str, size: int, options: dict, ratios: list[float], batch: int, seconds: float,
            repeats: int, xla: bool = False) -> list[dict]:
    import keras

    from lottery.compaction import compact, inference_rate, model_cost
    from lottery.structured import select_channels
    from train.models import build_model

    keras.utils.set_random_seed(0)
    dense = build_model(name, num_classes=10, input_size=size, **options)
    dense_cost = model_cost(dense)
    if xla:
        dense.compile(jit_compile=True)  # predict_on_batch then runs an XLA-compiled step
    rows = []
    for ratio in ratios:
        small = compact(dense, select_channels(dense, "l1", ratio, scope="layer"))
        small_cost = model_cost(small)
        if xla:
            small.compile(jit_compile=True)
        dense_rates, small_rates = [], []
        for _ in tqdm(range(repeats), desc=f"{name} {ratio:.0%}", unit="repeat", leave=False, disable=None):
            # Alternate, so a burst of load from other processes hits both alike.
            dense_rates.append(inference_rate(dense, batch_size=batch, seconds=seconds))
            small_rates.append(inference_rate(small, batch_size=batch, seconds=seconds))
        d, s = float(np.median(dense_rates)), float(np.median(small_rates))
        flop_ratio = dense_cost["flops"] / small_cost["flops"]
        row = {
            "model": name, "input": size, "options": options, "ratio": ratio, "criterion": "l1",
            "scope": "layer", "batch": batch, "xla": xla,
            "dense": dense_cost, "compact": small_cost,
            "dense_flops_by_kind": flops_by_kind(dense), "compact_flops_by_kind": flops_by_kind(small),
            "flop_ratio": flop_ratio, "param_ratio": dense_cost["params"] / small_cost["params"],
            "dense_images_s": d, "compact_images_s": s, "dense_images_s_all": dense_rates,
            "compact_images_s_all": small_rates, "speedup": s / d, "speedup_per_flop_ratio": s / d / flop_ratio,
        }
        if abs(ratio - TARGET_RATIO) < 1e-9:
            row["target"] = TARGET
            row["pass"] = row["speedup_per_flop_ratio"] >= TARGET
        log.info("%s ratio %.1f: %.0f -> %.0f img/s (x%.2f), FLOPs /%.2f", name, ratio, d, s, s / d, flop_ratio)
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'model':<14}{'ratio':>6}{'params dense->compact':>24}{'MFLOPs':>10}{'FLOP x':>8}{'dense img/s':>13}"
            f"{'compact img/s':>15}{'speed-up':>10}{'s-u/FLOP':>10}  target")
    lines = [head]
    for r in rows:
        verdict = "" if "pass" not in r else (f">= {r['target']} " + ("PASS" if r["pass"] else "FAIL"))
        params = f"{r['dense']['params']:,} -> {r['compact']['params']:,}"
        lines.append(f"{r['model']:<14}{r['ratio']:>6.1f}{params:>24}"
                     f"{r['compact']['flops'] / 1e6:>10.1f}{r['flop_ratio']:>8.2f}{r['dense_images_s']:>13.0f}"
                     f"{r['compact_images_s']:>15.0f}{r['speedup']:>10.2f}{r['speedup_per_flop_ratio']:>10.2f}  {verdict}")
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
    parser.add_argument("--xla", action="store_true", help="XLA-compile both models' predict steps")
    parser.add_argument("--explain", action="store_true",
                        help="also measure 3x3 conv multiply-adds/s by channel width (why speed-up < FLOP ratio)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compaction_speedup.json")
    args = parser.parse_args(argv)
    setup_logging()
    ratios = [float(r) for r in args.ratios.split(",")]
    cases = {"mobilenet_v2": (args.mobilenet_size, {"alpha": args.alpha}),
             "resnet20": (args.resnet_size, {}), "resnet44": (args.resnet_size, {}),
             "resnet56": (args.resnet_size, {})}
    rows = []
    for name in args.models.split(","):
        if name not in cases:
            parser.error(f"--models: {name!r} is not one of {sorted(cases)}")
        size, options = cases[name]
        rows.extend(measure(name, size, options, ratios, args.batch, args.seconds, args.repeats, args.xla))
    print(_table(rows))
    efficiency = conv_efficiency(args.batch, min(args.seconds, 0.5)) if args.explain else []
    if efficiency:
        print("\n3x3 conv stack, GMAC/s (conv only | conv+BN+ReLU)")
        print(f"{'size':>6}" + "".join(f"{'w=' + str(w):>16}" for w in sorted({e['width'] for e in efficiency})))
        for size in sorted({e["size"] for e in efficiency}, reverse=True):
            cells = {(e["width"], e["bn_relu"]): e["gmac_s"] for e in efficiency if e["size"] == size}
            print(f"{size:>6}" + "".join(f"{cells[(w, False)]:>8.1f} |{cells[(w, True)]:>6.1f}"
                                         for w in sorted({w for w, _ in cells})))
    write_json(args.out, {
        "conv_efficiency": efficiency,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                    "platform": platform.platform()},
        "cases": rows,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
