"""Structured (channel) pruning: which channels must go together, which to remove, and masking them.

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

Masks use the common format of `lottery.prune.masks` (boolean entries that broadcast to the weight):
per-output-channel entries are shape (out,), per-input-channel (in, 1), both (in, out); a
DepthwiseConv2D kernel (kh, kw, C, 1) takes (C, 1). `select_channels` returns a `StructuredMask`:
a plain `dict` with a `.meta` attribute to pass to `masks.save_mask`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from lottery.prune import criteria
from lottery.prune import masks as masks_mod

log = logging.getLogger(__name__)

SCOPES = ("layer", "global")


class StructuredMask(dict):
    """A mask (weight path -> bool entry) plus `.meta` (criterion, ratio, scope, groups) for save_mask."""

    def __init__(self, entries: Mapping[str, np.ndarray] = (), meta: Mapping[str, Any] | None = None):
        super().__init__(entries)
        self.meta: dict[str, Any] = dict(meta or {})


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


# ------------------------------------------------------------------------------- graph traversal
def _k():
    import keras

    return keras


def _functional_type():
    from keras.src.models.functional import Functional

    return Functional


def _check_graph_model(model) -> None:
    from keras.src.models.sequential import Sequential

    if isinstance(model, Sequential) or not isinstance(model, _functional_type()):
        raise ValueError(f"model {getattr(model, 'name', model)!r}: structured pruning needs a functional "
                         f"Keras model (got {type(model).__name__}); nested Sequential or subclassed "
                         f"models cannot be followed")


def _nodes(fmodel) -> Iterator[Any]:
    """The non-input nodes of one functional graph in execution order (as Keras runs them)."""
    for depth in sorted(fmodel._nodes_by_depth, reverse=True):
        for node in fmodel._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                yield node


def flat_nodes(model) -> Iterator[tuple[Any, list, list]]:
    """(layer, input tensors, output tensors) for every layer call, nested functional models inlined.

    The tensors are the symbolic KerasTensors of the graph that owns the call (shapes with batch None).
    """
    _check_graph_model(model)
    functional = _functional_type()
    for node in _nodes(model):
        op = node.operation
        if isinstance(op, functional):
            yield from flat_nodes(op)
        else:
            yield op, list(node.input_tensors), list(node.outputs)


# ---------------------------------------------------------------------------------- layer kinds
def _zero_preserving_activations() -> set:
    a = _k().activations
    names = ("linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "hard_silu", "mish",
             "tanh", "softsign", "celu", "hard_tanh", "tanh_shrink", "soft_shrink", "hard_shrink")
    return {getattr(a, n) for n in names if hasattr(a, n)}


def _passthrough_types() -> tuple[type, ...]:
    """Layers that act on each channel separately and map an all-zero channel to zeros."""
    L = _k().layers
    names = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
             "GaussianDropout", "Identity", "ActivityRegularization",
             "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
             "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
             "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D",
             "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D",
             "UpSampling3D", "Resizing")
    return tuple(getattr(L, n) for n in names if hasattr(L, n))


def _merge_types() -> tuple[type, ...]:
    L = _k().layers
    return (L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum)


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


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
        _check_graph_model(model)
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
        for t in _flatten(model.inputs):
            self._set(t, self.spaces.new(t.shape[-1] or 0, f"input:{_tensor_name(t)}", "model input"))
        self._walk(model)
        for t in _flatten(model.outputs):
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
        functional = _functional_type()
        for node in _nodes(fmodel):
            layer = node.operation
            inputs, outputs = list(node.input_tensors), list(node.outputs)
            if isinstance(layer, functional):
                self._nested(layer, inputs, outputs)
            else:
                self._layer(layer, inputs, outputs)

    def _nested(self, inner, inputs, outputs) -> None:
        _check_graph_model(inner)
        inner_inputs = _flatten(inner.inputs)
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
        for src, dst in zip(_flatten(inner.outputs), outputs):
            self._set(dst, *self._get(src))

    def _layer(self, layer, inputs, outputs) -> None:
        L = _k().layers
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
            if layer.groups != 1 or not _channels_last(layer) or repeat != 1:
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
            if layer.depth_multiplier != 1 or not _channels_last(layer) or repeat != 1:
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
            if not _channels_last(layer) or any(d is None for d in x.shape[1:]):
                return self._opaque(layer, inputs, outputs, "Flatten of an unknown or channels-first shape")
            spatial = int(np.prod(x.shape[1:-1], dtype=np.int64)) if len(x.shape) > 2 else 1
            return self._set(out, space, repeat * spatial)
        if kind in self._passthrough:
            if not _channels_last(layer):
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

    # -- masks from per-group keep vectors
    def entries(self, keeps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Mask entries of every weight that a pruned channel touches (groups missing from `keeps` stay whole)."""
        def pruned(gid):
            k = keeps.get(gid) if gid is not None else None
            return None if k is None or bool(np.all(k)) else np.asarray(k, dtype=bool)

        out: dict[str, np.ndarray] = {}
        for info in self.layers.values():
            layer = info.layer
            if info.kind in ("conv", "dense"):
                k_in, k_out = pruned(info.in_group), pruned(info.out_group)
                if k_in is not None:
                    k_in = np.tile(k_in, info.in_repeat)
                if k_in is not None and k_out is not None:
                    out[layer.kernel.path] = k_in[:, None] & k_out[None, :]
                elif k_in is not None:
                    out[layer.kernel.path] = k_in[:, None]
                elif k_out is not None:
                    out[layer.kernel.path] = k_out.copy()
                if k_out is not None and layer.bias is not None:
                    out[layer.bias.path] = k_out.copy()
            else:
                k = pruned(info.in_group)
                if k is None:
                    continue
                if info.kind == "depthwise":
                    out[layer.kernel.path] = k[:, None]
                    if layer.bias is not None:
                        out[layer.bias.path] = k.copy()
                else:
                    for var in (layer.gamma, layer.beta):
                        if var is not None:
                            out[var.path] = k.copy()
        return out

    def keeps_from_mask(self, mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-group keep vectors read off a structured mask; ValueError unless the mask is exactly that.

        Exactness (every touched weight masked, nothing masked inside kept channels) is what makes the
        masked model and the compacted one compute the same function.
        """
        variables = model_variables(self.model)
        unknown = sorted(set(mask) - set(variables))
        if unknown:
            raise ValueError(f"mask names weights model {self.model.name!r} does not have: {unknown[:5]}")
        full = {n: masks_mod.expand(e, tuple(variables[n].shape)) for n, e in mask.items()}
        keeps: dict[str, np.ndarray] = {}
        for g in self.groups:
            keep = np.ones(g.width, dtype=bool)
            for name in g.producers:
                kernel = self.layer(name).kernel.path
                if kernel in full:
                    cols = full[kernel].reshape(-1, g.width)
                    keep &= cols.any(axis=0)
            for name in g.bn_layers:
                gamma = self.layer(name).gamma
                if gamma is not None and gamma.path in full:
                    keep &= full[gamma.path]
            for name in g.depthwise:
                kernel = self.layer(name).kernel.path
                if kernel in full:
                    keep &= full[kernel].any(axis=(0, 1, 3))
            if not keep.all():
                if not g.prunable:
                    raise ValueError(f"mask prunes channels of group {g.id!r}, which is not prunable: "
                                     f"{'; '.join(g.reasons)}")
                if not keep.any():
                    raise ValueError(f"mask prunes every channel of group {g.id!r}")
                keeps[g.id] = keep
        expected = self.entries(keeps)
        for name, entry in full.items():
            want = masks_mod.expand(expected[name], entry.shape) if name in expected else np.ones((), bool)
            if not np.array_equal(entry, np.broadcast_to(want, entry.shape)):
                raise ValueError(f"mask entry {name!r} is not a channel mask consistent with its groups "
                                 f"(element-wise pruning inside kept channels, or groups that disagree)")
        missing = sorted(set(expected) - set(full))
        if missing:
            raise ValueError(f"mask lacks entries for weights its pruned channels touch: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        return keeps


def _flatten(x) -> list:
    from keras import tree

    return list(tree.flatten(x))


def _tensor_name(t) -> str:
    return getattr(t, "name", None) or repr(t)


def model_variables(model) -> dict[str, Any]:
    """Every variable of `model` (nested models included) by path; duplicate paths are an error."""
    found: dict[str, Any] = {}
    for var in model.weights:
        if var.path in found and found[var.path] is not var:
            raise ValueError(f"two variables share the path {var.path!r}: give the layers unique names")
        found[var.path] = var
    return found


# ----------------------------------------------------------------------------------- public API
def channel_groups(model) -> list[ChannelGroup]:
    """The channel groups of a functional Keras model (nested functional models followed), in order."""
    return Analysis(model).groups


def _excluded_groups(groups: list[ChannelGroup], exclude: Iterable[str]) -> set[str]:
    """Ids of groups touching a layer matched by any fnmatch pattern (a pattern matching none is an error)."""
    out: set[str] = set()
    every = sorted({name for g in groups for name in g.layers})
    for pattern in exclude:
        hit = False
        for g in groups:
            if any(fnmatch.fnmatchcase(name, pattern) for name in g.layers):
                out.add(g.id)
                hit = True
        if not hit:
            raise ValueError(f"exclude pattern {pattern!r} matches no layer of the model (layers: {every[:8]} ...)")
    return out


def group_scores(model, group: ChannelGroup, criterion: str, *, analysis: Analysis | None = None) -> np.ndarray:
    """One score per channel of `group`: weight criteria summed over its producers; bn: mean |gamma|.

    bn takes the mean over the group's BatchNorms (a residual group has several) so that, under a
    global threshold, a joined group is compared on the same scale as a single-BN one.
    """
    criteria.check_criterion(criterion)
    analysis = analysis or Analysis(model)
    if criterion == "bn":
        if not group.bn_layers:
            raise ValueError(f"criterion bn: group {group.id!r} has no BatchNorm")
        gammas = [criteria.bn_scores(analysis.layer(n).gamma.numpy()) for n in group.bn_layers]
        return np.mean(gammas, axis=0)
    scores = np.zeros(group.width, dtype=np.float64)
    for name in group.producers:
        scores += criteria.filter_scores(np.asarray(analysis.layer(name).kernel.numpy()), criterion, -1)
    return scores


def rounded_keep(width: int, kept: int, round_to: int) -> int:
    """How many of `width` channels to keep when `kept` are wanted and counts go by `round_to`.

    The nearest to `kept` of the multiples of `round_to` in [round_to, width], or `width` itself
    (a group left whole is always allowed): never above the width, never zero; ties go to the
    larger count (fewer channels pruned). A group narrower than `round_to` is kept whole.
    Why: CPU kernels work in vector-width blocks of channels (8 floats AVX2, 16 AVX-512), so a
    layer of 12 channels costs about what one of 16 costs (as Torch-Pruning's `round_to`).
    """
    width, kept, round_to = int(width), int(kept), int(round_to)
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    if not 1 <= kept <= width:
        raise ValueError(f"kept must be in [1, width={width}], got {kept}")
    if round_to == 1:
        return kept
    allowed = list(range(round_to, width + 1, round_to)) + [width]
    return int(min(allowed, key=lambda n: (abs(n - kept), -n)))


def _keep_top(scores: np.ndarray, keep: int) -> np.ndarray:
    """True for the `keep` highest scores; ties broken as criteria.keep_mask does (earlier goes first)."""
    n = scores.size
    order = np.lexsort((np.arange(n), scores))  # pruned first
    out = np.ones(n, dtype=bool)
    out[order[:n - keep]] = False
    return out


def select_channels(model, criterion: str, ratio: float, *, scope: str | None = None,
                    exclude: Iterable[str] = (), round_to: int = 1) -> StructuredMask:
    """A structured mask pruning the fraction `ratio` of the channels of every prunable group.

    scope "layer": `ratio` of each group's channels (lowest scores); "global": one threshold over
    all prunable groups' scores (for bn this is network slimming), each group keeping >= 1 channel.
    Default scope: "global" for bn, "layer" otherwise. Groups touching a layer matched by an
    `exclude` pattern (fnmatch on layer names) are kept whole; under bn, groups without a BatchNorm
    are kept whole (logged).

    `round_to` N > 1: each pruned group then keeps a multiple of N channels (`rounded_keep`: the
    nearest to what the criterion chose, never above the width, never zero; the extra or fewer
    channels follow the same scores), so compacted layers stay in the CPU's vector-width blocks.
    """
    criteria.check_criterion(criterion)
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    round_to = int(round_to)
    scope = scope or ("global" if criterion == "bn" else "layer")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0 or np.isnan(ratio):
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    exclude = tuple(exclude)
    analysis = Analysis(model)
    excluded = _excluded_groups(analysis.groups, exclude)
    candidates = [g for g in analysis.groups if g.prunable and g.id not in excluded]
    if criterion == "bn":
        no_bn = [g.id for g in candidates if not g.bn_layers]
        if no_bn:
            log.info("criterion bn: %d group(s) without BatchNorm kept whole: %s", len(no_bn), no_bn[:5])
        candidates = [g for g in candidates if g.bn_layers]
        if not candidates:
            raise ValueError(f"criterion bn needs BatchNorm layers in prunable groups; model "
                             f"{model.name!r} has none (use l1, l2 or fpgm)")
    scores = {g.id: group_scores(model, g, criterion, analysis=analysis) for g in candidates}
    keeps: dict[str, np.ndarray] = {}
    if scope == "layer":
        for g in candidates:
            keeps[g.id] = criteria.keep_mask(scores[g.id], ratio)
    elif candidates:
        flat = np.concatenate([scores[g.id] for g in candidates])
        keep = criteria.keep_mask(flat, ratio)
        offset = 0
        for g in candidates:
            k = keep[offset:offset + g.width].copy()
            offset += g.width
            if not k.any():  # a group emptied by the global threshold would cut the network
                k[int(np.argmax(scores[g.id]))] = True
            keeps[g.id] = k
    if round_to > 1:
        for g in candidates:
            want = rounded_keep(g.width, int(np.count_nonzero(keeps[g.id])), round_to)
            keeps[g.id] = _keep_top(scores[g.id], want)
    entries = analysis.entries(keeps)
    kept_by_group = {g.id: int(np.count_nonzero(keeps[g.id])) if g.id in keeps else g.width
                     for g in analysis.groups}
    total = sum(g.width for g in candidates)
    pruned = sum(g.width - kept_by_group[g.id] for g in candidates)
    meta = {
        "kind": "structured", "criterion": criterion, "ratio": ratio, "scope": scope, "exclude": list(exclude),
        "round_to": round_to,
        "model": model.name, "channels": total, "pruned_channels": pruned,
        "groups": [{"id": g.id, "width": g.width, "kept": kept_by_group[g.id],
                    "prunable": g.prunable and g.id not in excluded} for g in analysis.groups],
    }
    log.info("select_channels %s/%s ratio %.2f round_to %d: %d of %d channels pruned in %d groups",
             criterion, scope, ratio, round_to, pruned, total, len(candidates))
    return StructuredMask(entries, meta)


def apply_structured(model, mask: Mapping[str, np.ndarray]) -> None:
    """Zero, in place, every weight the structured `mask` prunes (kernels, biases, BN gamma and beta).

    The mask is checked first (ValueError unless it is an exact channel mask of this model), so the
    pruned channels then output exactly 0 and `compaction.compact` gives the same function.
    """
    Analysis(model).keeps_from_mask(mask)
    variables = model_variables(model)
    for name, entry in mask.items():
        var = variables[name]
        value = np.asarray(var.numpy())
        var.assign(np.where(masks_mod.expand(entry, value.shape), value, np.zeros((), value.dtype)))
