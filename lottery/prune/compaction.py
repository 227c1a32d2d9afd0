"""Compaction: turn a channel-masked model into a physically smaller plain Keras model, and measure cost.

`compact` rebuilds the model's graph (nested functional models included, names kept) with each
Conv2D / Dense narrowed to its kept filters / units, and copies the surviving slices of every
kernel, bias and BatchNorm variable. Layers whose width follows their input (BatchNorm,
DepthwiseConv2D, pooling, Flatten, ...) need no change to their config. The result has no masks
and no custom layers: it saves as `.keras`, loads with `safe_mode=True` and trains like any model.

`fold_batchnorm` is the Keras inference export: BatchNorm merged into the convolution before it
(same outputs, one memory-bound pass fewer per layer). Time dense and compacted models under the
same export (lottery.points.inference), or the ratio compares different things.

`model_cost` counts what the report compares before and after: parameters, FLOPs and file size.
FLOPs are multiply-accumulates at batch 1 of the layers that dominate inference cost: Conv1D/2D/3D
(out positions x filters x kernel size x in channels / groups), transposed convolutions,
DepthwiseConv (out positions x channels x kernel size), SeparableConv (depthwise + pointwise) and
Dense (positions x in x units). Biases, BatchNorm, activations, pooling, padding, resizing, merges
and softmax are not counted: each costs O(activations), not O(weights x positions).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lottery.prune import keras_graph
from lottery.prune.channel_graph import Analysis, channels_last, require_functional
from lottery.prune.channel_masks import keeps_from_mask

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- compaction
class _Rebuilder:
    def __init__(self, analysis: Analysis, keeps: Mapping[str, np.ndarray]):
        self.a = analysis
        self.keeps = keeps
        self.pairs: dict[int, tuple[Any, Any]] = {}   # id(old layer) -> (old, new): shared layers stay shared

    def kept(self, gid: str | None) -> np.ndarray | None:
        return None if gid is None else self.keeps.get(gid)

    def tensor_width(self, tensor) -> int:
        group, repeat = self.a.tensor_group(tensor)
        keep = self.kept(group)
        return tensor.shape[-1] if keep is None else int(np.count_nonzero(keep)) * repeat

    def model(self, fmodel):
        return keras_graph.rebuild(fmodel, self.layer,
                                   input_shape=lambda t: tuple(t.shape[:-1]) + (self.tensor_width(t),))

    def layer(self, old):
        if id(old) in self.pairs:
            return self.pairs[id(old)][1]
        if keras_graph.is_functional(old):
            new = self.model(old)
        else:
            config = old.get_config()
            info = self.a.layers.get(old.name)
            if info is not None and info.layer is old:
                keep = self.kept(info.out_group)
                if keep is not None and info.kind == "conv":
                    config["filters"] = int(np.count_nonzero(keep))
                elif keep is not None and info.kind == "dense":
                    config["units"] = int(np.count_nonzero(keep))
            new = type(old).from_config(config)
        self.pairs[id(old)] = (old, new)
        return new

    def sliced(self, old_layer, var) -> np.ndarray:
        """The surviving part of one variable of `old_layer`."""
        value = np.asarray(var.numpy())
        info = self.a.layers.get(old_layer.name)
        if info is None or info.layer is not old_layer:
            return value
        k_in, k_out = self.kept(info.in_group), self.kept(info.out_group)
        if info.kind in ("conv", "dense"):
            if var.name == "kernel":
                if k_in is not None:
                    value = np.compress(np.tile(k_in, info.in_repeat), value, axis=value.ndim - 2)
                if k_out is not None:
                    value = np.compress(k_out, value, axis=value.ndim - 1)
            elif var.name == "bias" and k_out is not None:
                value = np.compress(k_out, value, axis=0)
        elif info.kind == "depthwise" and k_in is not None:
            value = np.compress(k_in, value, axis=2 if var.name == "kernel" else 0)
        elif info.kind == "bn" and k_in is not None:
            value = np.compress(k_in, value, axis=0)
        return value

    def copy_weights(self) -> None:
        _copy_weights(self.pairs, lambda old: {v.name: self.sliced(old, v) for v in old.weights},
                      "compaction")


def compact(model, mask: Mapping[str, np.ndarray]):
    """A new, physically smaller Keras model computing what `model` masked by `mask` computes.

    `mask`: a structured mask of `model` (from `channel_masks.select_channels`, or loaded from its
    file); ValueError if it is not an exact channel mask. `model` itself is not changed and need
    not have been masked: the pruned channels are simply left out.
    """
    analysis = Analysis(model)
    keeps = keeps_from_mask(analysis, mask)
    rebuild = _Rebuilder(analysis, keeps)
    new = rebuild.model(model)
    rebuild.copy_weights()
    log.info("compacted %s: %d -> %d parameters (%d groups narrowed)", model.name, model.count_params(),
             new.count_params(), len(keeps))
    return new


# ----------------------------------------------------------------------------- inference export
def _identity(x, *args, **kwargs):
    return x


class _Folder:
    """Rebuilds a functional graph with each foldable BatchNorm merged into its producer.

    A BatchNorm folds when its input comes straight from a Conv2D / DepthwiseConv2D / Dense of the
    same graph that has no activation of its own, is called once, and feeds nothing but that
    BatchNorm (then the BatchNorm's inference-time affine map can move into the kernel and bias).
    """

    def __init__(self):
        self.folds: dict[int, Any] = {}                # id(producer) -> the BatchNorm folded into it
        self.folded_bns: set[int] = set()
        self.pairs: dict[int, tuple[Any, Any]] = {}

    def plan(self, fmodel) -> None:
        import keras

        L = keras.layers
        uses: dict[int, int] = {}
        for t in keras_graph.flatten(fmodel.outputs):
            uses[id(t)] = uses.get(id(t), 0) + 1
        calls = list(keras_graph.calls(fmodel))
        for call in calls:
            for t in call.inputs:
                uses[id(t)] = uses.get(id(t), 0) + 1
        linear = keras.activations.linear
        for op, inputs, _ in calls:
            if keras_graph.is_functional(op):
                self.plan(op)
                continue
            if type(op) is not L.BatchNormalization or keras_graph.call_count(op) != 1 or len(inputs) != 1:
                continue
            x = inputs[0]
            axis = op.axis if isinstance(op.axis, int) else None
            if axis not in (-1, len(x.shape) - 1) or uses.get(id(x), 0) != 1:
                continue
            producer = keras_graph.producer(x)
            if (type(producer) not in (L.Conv2D, L.DepthwiseConv2D, L.Dense)
                    or keras_graph.call_count(producer) != 1 or id(producer) in self.folds
                    or getattr(producer, "activation", linear) is not linear
                    or getattr(producer, "quantization_mode", None) or getattr(producer, "lora_enabled", False)
                    or not channels_last(producer)
                    or (type(producer) is L.Conv2D and producer.groups != 1)):
                continue
            self.folds[id(producer)] = op
            self.folded_bns.add(id(op))

    def model(self, fmodel):
        return keras_graph.rebuild(fmodel, self.layer)

    def layer(self, old):
        if id(old) in self.folded_bns:
            return _identity
        if id(old) in self.pairs:
            return self.pairs[id(old)][1]
        if keras_graph.is_functional(old):
            new = self.model(old)
        else:
            config = old.get_config()
            if id(old) in self.folds:
                config["use_bias"] = True
            new = type(old).from_config(config)
        self.pairs[id(old)] = (old, new)
        return new

    def copy_weights(self) -> None:
        def values_of(old):
            values = {v.name: np.asarray(v.numpy()) for v in old.weights}
            bn = self.folds.get(id(old))
            return values if bn is None else _folded(old, bn, values)

        _copy_weights(self.pairs, values_of, "fold_batchnorm")


def _copy_weights(pairs, values_of, what: str) -> None:
    """Assign each rebuilt layer the values `values_of(old layer)` gives, by variable name, after
    checking that the rebuilt layer has exactly those variables in exactly those shapes."""
    for old, new in pairs.values():
        if keras_graph.is_functional(old):  # nested models hold no variables of their own
            continue
        values = values_of(old)
        targets = {v.name: v for v in new.weights}
        if set(targets) != set(values):
            raise ValueError(f"{what}: layer {old.name!r} rebuilt with variables {sorted(targets)}, "
                             f"expected {sorted(values)}")
        for name, var in targets.items():
            value = values[name]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{what}: {old.name}/{name} has shape {value.shape} but the rebuilt "
                                 f"layer expects {tuple(var.shape)}")
            var.assign(value.astype(var.dtype, copy=False))


def _folded(layer, bn, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`layer`'s kernel and bias with `bn`'s inference map y = (x - mean) / sqrt(var + eps) * gamma + beta
    folded in (in float64, so the folded model differs from the original by float32 rounding only)."""
    import keras

    L = keras.layers
    var = np.asarray(bn.moving_variance.numpy(), np.float64)
    scale = 1.0 / np.sqrt(var + float(bn.epsilon))
    if bn.gamma is not None:
        scale = scale * np.asarray(bn.gamma.numpy(), np.float64)
    shift = -np.asarray(bn.moving_mean.numpy(), np.float64) * scale
    if bn.beta is not None:
        shift = shift + np.asarray(bn.beta.numpy(), np.float64)
    kernel = values["kernel"].astype(np.float64)
    if isinstance(layer, L.DepthwiseConv2D):   # (kh, kw, C, multiplier): output c * multiplier + m
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:                                      # (..., in, out)
        kernel = kernel * scale
    bias = values.get("bias")
    bias = np.zeros_like(scale) if bias is None else bias.astype(np.float64).reshape(-1)
    out = dict(values)
    out["kernel"], out["bias"] = kernel, bias * scale + shift
    return out


def fold_batchnorm(model):
    """An inference-time copy of `model` with every foldable BatchNorm merged into the layer before it.

    Each BatchNorm directly after a Conv2D / DepthwiseConv2D / Dense (nothing in between, no
    activation on the producer, the producer's output used by that BatchNorm only) disappears and
    the producer gains the folded kernel and a bias: same outputs up to float rounding, fewer
    memory-bound passes (the BatchNorm's read and write of every activation). Other BatchNorms stay.
    For inference only: the folded model has no batch statistics to train with. Nested functional
    models are folded inside; layer names are kept; `model` is not changed.
    """
    require_functional(model)
    folder = _Folder()
    folder.plan(model)
    new = folder.model(model)
    folder.copy_weights()
    log.info("folded %d BatchNorm layer(s) of %s", len(folder.folds), model.name)
    return new


# -------------------------------------------------------------------------------------------- cost
def _known(shape, what: str, layer) -> list[int]:
    dims = list(shape)
    if any(d is None for d in dims):
        raise ValueError(f"FLOPs of layer {layer.name!r}: {what} shape {tuple(shape)} is not fully known "
                         f"(build the model with a fixed input size)")
    return [int(d) for d in dims]


def layer_flops(layer, inputs, outputs) -> int:
    """Multiply-accumulates of one layer call at batch 1 (0 for layers that are not counted)."""
    import keras

    L = keras.layers
    conv = keras_graph.conv_types()
    if not isinstance(layer, (*conv, L.Dense)):
        return 0
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        raise ValueError(f"FLOPs of layer {layer.name!r}: channels_first is not supported")
    x = _known(inputs[0].shape[1:], "input", layer)
    y = _known(outputs[0].shape[1:], "output", layer)
    in_c, positions = x[-1], int(np.prod(y[:-1], dtype=np.int64))
    if isinstance(layer, L.Dense):
        return positions * in_c * int(layer.units)
    window = int(np.prod(layer.kernel_size, dtype=np.int64))
    if isinstance(layer, conv.depthwise):
        return positions * y[-1] * window
    if isinstance(layer, conv.separable):
        mid = in_c * int(layer.depth_multiplier)
        return positions * mid * window + positions * mid * y[-1]
    if isinstance(layer, conv.transpose):
        return int(np.prod(x[:-1], dtype=np.int64)) * window * in_c * y[-1]
    return positions * y[-1] * window * in_c // int(getattr(layer, "groups", 1) or 1)


def model_flops(model) -> int:
    """Multiply-accumulates of every layer call at batch 1, nested functional models included."""
    require_functional(model)
    return int(sum(layer_flops(layer, ins, outs) for layer, ins, outs in keras_graph.walk_calls(model)))


def file_bytes(model) -> int:
    """Size of the model saved as `.keras` (in a temporary directory, removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="bt-cost-") as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        return os.path.getsize(path)


def model_cost(model) -> dict[str, int]:
    """{"params": count_params(), "flops": multiply-adds at batch 1, "file_bytes": saved .keras size}."""
    return {"params": int(model.count_params()), "flops": model_flops(model), "file_bytes": file_bytes(model)}
