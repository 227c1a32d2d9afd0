"""Structured (channel) masks: which channels to remove, the masks that remove them, and applying them.

Masks use the common format of `lottery.prune.masks` (boolean entries that broadcast to the weight):
per-output-channel entries are shape (out,), per-input-channel (in, 1), both (in, out); a
DepthwiseConv2D kernel (kh, kw, C, 1) takes (C, 1). `select_channels` returns a `StructuredMask`:
a plain `dict` with a `.meta` attribute to pass to `masks.save_mask`. Which channels go together,
and which may go at all, is lottery.prune.channel_graph's analysis.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Iterable, Mapping

import numpy as np

from lottery.prune import criteria
from lottery.prune import masks as masks_mod
from lottery.prune.channel_graph import Analysis, ChannelGroup

log = logging.getLogger(__name__)

SCOPES = masks_mod.SCOPES  # the same scopes as magnitude masks


class StructuredMask(dict):
    """A mask (weight path -> bool entry) plus `.meta` (criterion, ratio, scope, groups) for save_mask."""

    def __init__(self, entries: Mapping[str, np.ndarray] = (), meta: Mapping[str, Any] | None = None):
        super().__init__(entries)
        self.meta: dict[str, Any] = dict(meta or {})


def model_variables(model) -> dict[str, Any]:
    """Every variable of `model` (nested models included) by path; duplicate paths are an error."""
    found: dict[str, Any] = {}
    for var in model.weights:
        if var.path in found and found[var.path] is not var:
            raise ValueError(f"two variables share the path {var.path!r}: give the layers unique names")
        found[var.path] = var
    return found


def mask_entries(analysis: Analysis, keeps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mask entries of every weight that a pruned channel touches, from per-group keep vectors
    (groups missing from `keeps` stay whole)."""
    def pruned(gid):
        k = keeps.get(gid) if gid is not None else None
        return None if k is None or bool(np.all(k)) else np.asarray(k, dtype=bool)

    out: dict[str, np.ndarray] = {}
    for info in analysis.layers.values():
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

def keeps_from_mask(analysis: Analysis, mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-group keep vectors read off a structured mask; ValueError unless the mask is exactly that.

    Exactness (every touched weight masked, nothing masked inside kept channels) is what makes the
    masked model and the compacted one compute the same function.
    """
    variables = model_variables(analysis.model)
    unknown = sorted(set(mask) - set(variables))
    if unknown:
        raise ValueError(f"mask names weights model {analysis.model.name!r} does not have: {unknown[:5]}")
    full = {n: masks_mod.expand(e, tuple(variables[n].shape)) for n, e in mask.items()}
    keeps: dict[str, np.ndarray] = {}
    for g in analysis.groups:
        keep = np.ones(g.width, dtype=bool)
        for name in g.producers:
            kernel = analysis.layer(name).kernel.path
            if kernel in full:
                cols = full[kernel].reshape(-1, g.width)
                keep &= cols.any(axis=0)
        for name in g.bn_layers:
            gamma = analysis.layer(name).gamma
            if gamma is not None and gamma.path in full:
                keep &= full[gamma.path]
        for name in g.depthwise:
            kernel = analysis.layer(name).kernel.path
            if kernel in full:
                keep &= full[kernel].any(axis=(0, 1, 3))
        if not keep.all():
            if not g.prunable:
                raise ValueError(f"mask prunes channels of group {g.id!r}, which is not prunable: "
                                 f"{'; '.join(g.reasons)}")
            if not keep.any():
                raise ValueError(f"mask prunes every channel of group {g.id!r}")
            keeps[g.id] = keep
    expected = mask_entries(analysis, keeps)
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
    entries = mask_entries(analysis, keeps)
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
    keeps_from_mask(Analysis(model), mask)
    variables = model_variables(model)
    for name, entry in mask.items():
        var = variables[name]
        value = np.asarray(var.numpy())
        var.assign(np.where(masks_mod.expand(entry, value.shape), value, np.zeros((), value.dtype)))
