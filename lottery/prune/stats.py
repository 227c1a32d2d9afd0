"""Which weights are prunable, and the magnitude statistics researchers read before choosing thresholds.

Prunable weights are the kernels of convolution (incl. transposed), depthwise, separable and dense
layers; never biases, BatchNorm or embeddings. Each is named by its Keras variable path (for example
`lenet/fc1/kernel`), which is stable as long as the model builder names its layers.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from common.atomic import write_json
from lottery.prune import keras_graph

# Kernel variable names (the last component of the Keras variable path) that are prunable.
KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")
# 0, 10, ..., 90 and then every percent up to 99: the tail is where pruning thresholds live.
PERCENTS = tuple(range(0, 90, 10)) + tuple(range(90, 100))


def prunable_variables(model) -> dict[str, Any]:
    """Keras variables of the prunable kernels, by variable path, in model order."""
    types = keras_graph.prunable_layer_types()
    found: dict[str, Any] = {}
    for layer in keras_graph.all_layers(model):
        if not isinstance(layer, types):
            continue
        for var in layer.weights:
            if var.name not in KERNEL_NAMES:
                continue
            if var.path in found and found[var.path] is not var:
                raise ValueError(
                    f"two prunable variables share the path {var.path!r}: give the layers unique names"
                )
            found[var.path] = var
    if not found:
        raise ValueError(f"model {model.name!r} has no prunable (conv/depthwise/dense) kernels")
    return found


def prunable_weights(model) -> dict[str, np.ndarray]:
    """NumPy copies of the prunable kernels, by Keras variable path."""
    return {name: np.array(var.numpy()) for name, var in prunable_variables(model).items()}


def weight_stats(weights: Mapping[str, np.ndarray]) -> dict:
    """Magnitude quantiles over all prunable weights together, plus per-layer counts."""
    if not weights:
        raise ValueError("weight_stats: no weights given")
    magnitudes = np.concatenate([np.abs(np.asarray(w, dtype=np.float64)).ravel() for w in weights.values()])
    values = np.percentile(magnitudes, PERCENTS) if magnitudes.size else np.zeros(len(PERCENTS))
    layers = {}
    for name, w in weights.items():
        a = np.abs(np.asarray(w, dtype=np.float64))
        layers[name] = {
            "shape": list(a.shape),
            "count": int(a.size),
            "nonzero": int(np.count_nonzero(a)),
            "share": float(a.size / magnitudes.size),
            "median_magnitude": float(np.median(a)) if a.size else 0.0,
            "max_magnitude": float(a.max()) if a.size else 0.0,
        }
    return {
        "count": int(magnitudes.size),
        "nonzero": int(np.count_nonzero(magnitudes)),
        "max_magnitude": float(magnitudes.max()) if magnitudes.size else 0.0,
        "quantiles": [{"percent": p, "magnitude": float(v)} for p, v in zip(PERCENTS, values)],
        "layers": layers,
    }


def format_stats_table(stats: Mapping[str, Any]) -> str:
    """A plain-text table: the quantiles, then one line per layer."""
    lines = [f"prunable weights: {stats['count']:,} ({stats['nonzero']:,} non-zero)", "",
             f"{'quantile':>8}  {'|w| below':>12}"]
    for row in stats["quantiles"]:
        lines.append(f"{row['percent']:>7d}%  {row['magnitude']:>12.6g}")
    lines.append(f"{'max':>8}  {stats['max_magnitude']:>12.6g}")
    lines.append("")
    width = max(len("layer"), *(len(n) for n in stats["layers"]))
    lines.append(f"{'layer':<{width}}  {'shape':>18}  {'count':>12}  {'share':>6}  {'median|w|':>10}")
    for name, row in stats["layers"].items():
        shape = "x".join(str(d) for d in row["shape"])
        lines.append(f"{name:<{width}}  {shape:>18}  {row['count']:>12,}  {row['share']:>6.1%}  "
                     f"{row['median_magnitude']:>10.4g}")
    return "\n".join(lines)


def write_stats(path: str | os.PathLike, stats: Mapping[str, Any]) -> None:
    """stats.json of the grid directory (atomic)."""
    write_json(path, dict(stats))
