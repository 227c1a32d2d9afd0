"""The channel graph: which channels of a model must be kept or removed together, and whether they may be.

A *channel group* is a set of channels that must be kept or removed together. It starts at the
output channels of its producers (Conv2D filters, Dense units) and follows them through every layer
that keeps channels apart (BatchNorm, element-wise activations, pooling, padding, resizing,
DepthwiseConv2D, Flatten) to its consumers (the input channels of the next Conv2D / Dense; after a
Flatten, Dense rows `index % C == c`). Residual merges (`Add` and friends) join the groups of their
inputs, so every branch of a residual stage loses the same channels. Nested functional models (such
as Keras' MobileNetV2 backbone inside our model) are followed through.

A group is prunable only if removing a channel provably leaves the rest of the network unchanged:
zeroing the channel's producer kernels, biases and BatchNorm gamma AND beta must make the channel
exactly 0 everywhere it flows, so activations must map 0 to 0 and BatchNorms must have a scale.
Model inputs and outputs (the classifier's logits) are never prunable, nor anything that passes
through a layer this module does not understand: such a layer pins the groups it touches (with a
reason) rather than risking a wrong model.

Which channels to remove, and the masks that remove them: lottery.prune.channel_masks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lottery.prune import keras_graph


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels kept or removed together. Layer names are the Keras layer names (unique per model)."""

    id: str                                   # the first producer's layer name (or input:/opaque: label)
    width: int
    prunable: bool
    reasons: tuple[str, ...]                  # why not prunable (empty when prunable)
    producers: tuple[str, ...]                # Conv2D / Dense layers whose output channels these are
    bn_layers: tuple[str, ...]
    depthwise: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]    # (Conv2D / Dense layer, repeat: Flatten spatial size)
    bn_gammas: tuple[str, ...]                # weight paths of the BatchNorm scales in the group
    kernels: tuple[str, ...]                  # producer kernel weight paths (for weight criteria)

    @property
    def layers(self) -> tuple[str, ...]:
        return self.producers + self.bn_layers + self.depthwise + tuple(c for c, _ in self.consumers)



def require_functional(model) -> None:
    """ValueError unless `model` is a functional Keras model (the only kind whose calls can be followed)."""
    if not keras_graph.is_functional(model):
        raise ValueError(f"model {getattr(model, 'name', model)!r}: structured pruning needs a functional "
                         f"Keras model (got {type(model).__name__}); nested Sequential or subclassed "
                         f"models cannot be followed")


def channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


# ---------------------------------------------------------------------------------- layer kinds
def _zero_preserving_activations() -> set:
    import keras

    a = keras.activations
    names = ("linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "hard_silu", "mish",
             "tanh", "softsign", "celu", "hard_tanh", "tanh_shrink", "soft_shrink", "hard_shrink")
    return {getattr(a, n) for n in names if hasattr(a, n)}


def _passthrough_types() -> tuple[type, ...]:
    """Layers that act on each channel separately and map an all-zero channel to zeros."""
    import keras

    L = keras.layers
    names = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
             "GaussianDropout", "Identity", "ActivityRegularization",
             "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
             "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
             "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D",
             "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D",
             "UpSampling3D", "Resizing")
    return tuple(getattr(L, n) for n in names if hasattr(L, n))


def _merge_types() -> tuple[type, ...]:
    import keras

    L = keras.layers
    return (L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum)



# --------------------------------------------------------------------------------- the analysis
class _Spaces:
    """Union-find over channel spaces; each root carries width, reasons, creation order and label."""

    def __init__(self):
        self.parent: list[int] = []
        self.width: list[int] = []
        self.label: list[str] = []
        self.reasons: list[list[str]] = []

    def new(self, width: int, label: str, reason: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.width.append(int(width))
        self.label.append(label)
        self.reasons.append([reason] if reason else [])
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.width[a] != self.width[b]:
            raise ValueError(f"channel groups {self.label[a]!r} ({self.width[a]}) and {self.label[b]!r} "
                             f"({self.width[b]}) are joined but differ in width")
        keep, drop = (a, b) if a < b else (b, a)  # the earlier-created space names the group
        self.parent[drop] = keep
        self.reasons[keep].extend(self.reasons[drop])
        return keep

    def pin(self, i: int, reason: str) -> None:
        self.reasons[self.find(i)].append(reason)


@dataclasses.dataclass
class LayerChannels:
    """How one weighted layer's axes relate to groups (group ids filled in after the walk)."""

    layer: Any
    kind: str                   # "conv" | "dense" | "depthwise" | "bn"
    in_space: int | None = None
    in_repeat: int = 1
    out_space: int | None = None
    in_group: str | None = None
    out_group: str | None = None


class Analysis:
    """The dependency analysis of one model: its groups and, per weighted layer, which groups it touches."""

    def __init__(self, model):
        require_functional(model)
        self.model = model
        self.spaces = _Spaces()
        self.state: dict[int, tuple[int, int]] = {}      # id(tensor) -> (space, repeat)
        self.tensors: dict[int, Any] = {}                 # keep tensors alive while ids are used
        self.layers: dict[str, LayerChannels] = {}        # by layer name
        self._layer_objs: dict[str, Any] = {}
        self._produced: dict[int, int] = {}               # id(layer) -> its output space
        self._zero_acts = _zero_preserving_activations()
        self._passthrough = _passthrough_types()
        self._merges = _merge_types()
        for t in keras_graph.flatten(model.inputs):
            self._set(t, self.spaces.new(t.shape[-1] or 0, f"input:{_tensor_name(t)}", "model input"))
        self._walk(model)
        for t in keras_graph.flatten(model.outputs):
            self.spaces.pin(self.state[id(t)][0], "model output (classifier width is fixed)")
        self.groups = self._groups()
        self.by_id = {g.id: g for g in self.groups}

    # -- bookkeeping
    def _set(self, tensor, space: int, repeat: int = 1) -> None:
        self.tensors[id(tensor)] = tensor
        self.state[id(tensor)] = (space, repeat)

    def _get(self, tensor) -> tuple[int, int]:
        try:
            return self.state[id(tensor)]
        except KeyError:
            raise ValueError(f"model {self.model.name!r}: tensor {_tensor_name(tensor)} is used before it "
                             f"is produced (graph walk order)") from None

    def _register(self, layer, kind: str) -> LayerChannels:
        other = self._layer_objs.get(layer.name)
        if other is not None and other is not layer:
            raise ValueError(f"model {self.model.name!r}: two layers are named {layer.name!r}; structured "
                             f"pruning names channels by layer, give them unique names")
        self._layer_objs[layer.name] = layer
        if layer.name not in self.layers:
            self.layers[layer.name] = LayerChannels(layer, kind)
        return self.layers[layer.name]

    def _consume(self, info: LayerChannels, space: int, repeat: int) -> None:
        # A layer called more than once must see the same channels at every call.
        if info.in_space is None:
            info.in_space, info.in_repeat = space, repeat
        elif info.in_repeat != repeat:
            self.spaces.pin(space, f"{info.layer.name} is called on inputs of different layouts")
            self.spaces.pin(info.in_space, f"{info.layer.name} is called on inputs of different layouts")
        else:
            info.in_space = self.spaces.union(info.in_space, space)

    def _produce(self, layer, width: int) -> int:
        if id(layer) not in self._produced:
            self._produced[id(layer)] = self.spaces.new(width, layer.name)
        return self._produced[id(layer)]

    def _opaque(self, layer, inputs, outputs, why: str) -> None:
        """A layer we cannot follow: pin what it reads, give what it writes fresh pinned groups."""
        for t in inputs:
            self.spaces.pin(self._get(t)[0], f"{why} ({layer.name}: {type(layer).__name__})")
        for i, t in enumerate(outputs):
            width = t.shape[-1] if t.shape else 1
            self._set(t, self.spaces.new(width or 0, f"opaque:{layer.name}:{i}",
                                         f"produced by {layer.name} ({type(layer).__name__}), not followed"))

    def _activation_ok(self, layer, space: int) -> None:
        act = getattr(layer, "activation", None)
        if act is not None and act not in self._zero_acts:
            self.spaces.pin(space, f"{layer.name}: activation {getattr(act, '__name__', act)!r} does not map 0 to 0")

    # -- the walk
    def _walk(self, fmodel) -> None:
        for layer, inputs, outputs in keras_graph.calls(fmodel):
            if keras_graph.is_functional(layer):
                self._nested(layer, inputs, outputs)
            else:
                self._layer(layer, inputs, outputs)

    def _nested(self, inner, inputs, outputs) -> None:
        require_functional(inner)
        inner_inputs = keras_graph.flatten(inner.inputs)
        if len(inner_inputs) != len(inputs):
            raise ValueError(f"nested model {inner.name!r}: {len(inputs)} inputs given, {len(inner_inputs)} expected")
        for src, dst in zip(inputs, inner_inputs):
            space, repeat = self._get(src)
            if id(dst) in self.state:  # called again: its channels must match the first call's
                old, old_repeat = self.state[id(dst)]
                space = self.spaces.union(old, space) if old_repeat == repeat else space
                if old_repeat != repeat:
                    self.spaces.pin(space, f"nested model {inner.name} called on different layouts")
            self._set(dst, space, repeat)
        self._walk(inner)
        for src, dst in zip(keras_graph.flatten(inner.outputs), outputs):
            self._set(dst, *self._get(src))

    def _layer(self, layer, inputs, outputs) -> None:
        import keras

        L = keras.layers
        kind = type(layer)
        if len(outputs) != 1:
            return self._opaque(layer, inputs, outputs, "multi-output layer")
        out = outputs[0]
        if kind in self._merges:
            shapes = {tuple(t.shape) for t in inputs}
            states = [self._get(t) for t in inputs]
            if len(shapes) != 1 or len({r for _, r in states}) != 1:
                return self._opaque(layer, inputs, outputs, "merge of differently shaped inputs")
            space = states[0][0]
            for s, _ in states[1:]:
                space = self.spaces.union(space, s)
            return self._set(out, space, states[0][1])
        if len(inputs) != 1:
            return self._opaque(layer, inputs, outputs, "layer with several inputs")
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return self._opaque(layer, inputs, outputs, "LoRA or quantized layer")
        x = inputs[0]
        space, repeat = self._get(x)
        if kind is L.Conv2D:
            if layer.groups != 1 or not channels_last(layer) or repeat != 1:
                return self._opaque(layer, inputs, outputs, "grouped or channels-first convolution")
            info = self._register(layer, "conv")
            self._consume(info, space, repeat)
            info.out_space = self._produce(layer, layer.filters)
            self._activation_ok(layer, info.out_space)
            return self._set(out, info.out_space)
        if kind is L.Dense:
            if len(x.shape) > 2 and repeat != 1:
                return self._opaque(layer, inputs, outputs, "Dense on a flattened tensor of rank > 2")
            info = self._register(layer, "dense")
            self._consume(info, space, repeat)
            info.out_space = self._produce(layer, layer.units)
            self._activation_ok(layer, info.out_space)
            return self._set(out, info.out_space)
        if kind is L.DepthwiseConv2D:
            if layer.depth_multiplier != 1 or not channels_last(layer) or repeat != 1:
                return self._opaque(layer, inputs, outputs, "depthwise convolution with depth_multiplier != 1")
            info = self._register(layer, "depthwise")
            self._consume(info, space, repeat)
            info.out_space = info.in_space
            self._activation_ok(layer, space)
            return self._set(out, self.spaces.find(space))
        if kind is L.BatchNormalization:
            axis = layer.axis if isinstance(layer.axis, int) else None
            if axis not in (-1, len(x.shape) - 1) or repeat != 1:
                return self._opaque(layer, inputs, outputs, "BatchNorm over a non-channel axis")
            info = self._register(layer, "bn")
            self._consume(info, space, repeat)
            info.out_space = info.in_space
            if not layer.scale:
                self.spaces.pin(space, f"{layer.name}: BatchNorm without scale cannot zero a channel")
            return self._set(out, self.spaces.find(space))
        if kind is L.Activation or kind is L.ReLU or kind is L.LeakyReLU or kind is L.ELU:
            if kind is L.Activation:
                self._activation_ok(layer, space)
            elif kind is L.ReLU and float(layer.threshold) > 0 and float(layer.negative_slope) != 0:
                self.spaces.pin(space, f"{layer.name}: ReLU with threshold and slope does not map 0 to 0")
            return self._set(out, space, repeat)
        if kind is L.Rescaling:
            scale, offset = np.asarray(layer.scale), np.asarray(layer.offset)
            if scale.size != 1 or offset.size != 1:
                return self._opaque(layer, inputs, outputs, "per-channel Rescaling")
            if float(offset) != 0.0:
                self.spaces.pin(space, f"{layer.name}: Rescaling with an offset does not map 0 to 0")
            return self._set(out, space, repeat)
        if kind is L.Flatten:
            if not channels_last(layer) or any(d is None for d in x.shape[1:]):
                return self._opaque(layer, inputs, outputs, "Flatten of an unknown or channels-first shape")
            spatial = int(np.prod(x.shape[1:-1], dtype=np.int64)) if len(x.shape) > 2 else 1
            return self._set(out, space, repeat * spatial)
        if kind in self._passthrough:
            if not channels_last(layer):
                return self._opaque(layer, inputs, outputs, "channels-first layer")
            return self._set(out, space, repeat)
        return self._opaque(layer, inputs, outputs, "unsupported layer")

    # -- results
    def _groups(self) -> list[ChannelGroup]:
        sp = self.spaces
        for info in self.layers.values():
            if info.in_space is not None:
                info.in_group = sp.label[sp.find(info.in_space)]
            if info.out_space is not None:
                info.out_group = sp.label[sp.find(info.out_space)]
        roots = sorted({sp.find(i) for i in range(len(sp.parent))})
        members: dict[str, dict[str, list]] = {sp.label[r]: {"producers": [], "bn": [], "dw": [], "consumers": []}
                                               for r in roots}
        for name, info in self.layers.items():
            if info.kind in ("conv", "dense"):
                members[info.out_group]["producers"].append(name)
                members[info.in_group]["consumers"].append((name, info.in_repeat))
            elif info.kind == "bn":
                members[info.in_group]["bn"].append(name)
            else:
                members[info.in_group]["dw"].append(name)
        groups = []
        for r in roots:
            label = sp.label[r]
            m = members[label]
            reasons = list(dict.fromkeys(sp.reasons[r]))
            if not m["producers"]:
                reasons.append("no producing Conv2D / Dense layer")
            bns = [self.layers[n].layer for n in m["bn"]]
            groups.append(ChannelGroup(
                id=label, width=sp.width[r], prunable=not reasons, reasons=tuple(reasons),
                producers=tuple(m["producers"]), bn_layers=tuple(m["bn"]), depthwise=tuple(m["dw"]),
                consumers=tuple(m["consumers"]),
                bn_gammas=tuple(b.gamma.path for b in bns if b.gamma is not None),
                kernels=tuple(self.layers[n].layer.kernel.path for n in m["producers"]),
            ))
        return groups

    def layer(self, name: str):
        return self._layer_objs[name]

    def tensor_group(self, tensor) -> tuple[str, int]:
        """(id of the group whose channels `tensor` carries, how often each repeats along its last
        axis: the spatial size after a Flatten, else 1)."""
        space, repeat = self._get(tensor)
        return self.spaces.label[self.spaces.find(space)], repeat


def _tensor_name(t) -> str:
    return getattr(t, "name", None) or repr(t)


def channel_groups(model) -> list[ChannelGroup]:
    """The channel groups of a functional Keras model (nested functional models followed), in order."""
    return Analysis(model).groups
