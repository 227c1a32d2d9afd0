"""Pruning masks: magnitude masks (global or per layer), random controls, IMP steps, sparsity, files.

A mask is a `dict[str, np.ndarray]` of booleans keyed by Keras variable path (see lottery.prune.stats);
True keeps a weight, False prunes it. An entry need not have the weight's full shape: it may be
any boolean array that broadcasts to it under NumPy rules. A per-output-channel (structured) mask
of a Dense kernel (in, out) or a Conv2D kernel (kh, kw, in, out) is therefore a vector of shape
(out,); a per-input-channel mask of a Conv2D kernel is shape (in, 1). `expand` gives the full-shape
view. The magnitude functions here produce element-wise entries; structured ones load, save,
count and train the same way.

Sparsity arguments count only the weights that may be pruned (excluded layers are kept whole);
`mask_sparsity` reports the real sparsity over every masked weight ('overall') and per layer. Ties in magnitude
are broken by position (sorted weight name, then flat index), so a requested sparsity prunes exactly
round(sparsity * n) weights and the same input always gives the same mask.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterable, Mapping

import numpy as np

# The magnitude maths and the mask files live in train (dense training prunes gradually with
# them, and train may not import lottery); every name stays importable from here.
from train.magnitude import (  # noqa: F401
    MAX_MASK_BYTES,
    META_KEY,
    SCOPES,
    Mask,
    _check_fraction,
    _check_scope,
    _full_base,
    _prune,
    _prune_lowest,
    _round_count,
    check_name,
    excluded_names,
    expand,
    layer_of,
    load_mask,
    magnitude_mask,
    ones_like,
    save_mask,
)


def global_magnitude_mask(weights: Mapping[str, np.ndarray], sparsity: float, exclude: Iterable[str] = (),
                          base: Mapping[str, np.ndarray] | None = None) -> Mask:
    return magnitude_mask(weights, sparsity, "global", exclude, base)


def layerwise_magnitude_mask(weights: Mapping[str, np.ndarray], sparsity: float, exclude: Iterable[str] = (),
                             base: Mapping[str, np.ndarray] | None = None) -> Mask:
    return magnitude_mask(weights, sparsity, "layer", exclude, base)


def quantile_thresholds(weights: Mapping[str, np.ndarray], quantile: float, scope: str = "global") -> dict[str, float]:
    """The magnitude at `quantile`, as in stats.json: over all prunable weights, or per layer."""
    quantile = _check_fraction(quantile, "quantile")
    scope = _check_scope(scope)
    if scope == "global":
        every = np.concatenate([np.abs(np.asarray(w, dtype=np.float64)).ravel() for w in weights.values()])
        t = float(np.quantile(every, quantile))
        return {n: t for n in weights}
    return {n: float(np.quantile(np.abs(np.asarray(w, dtype=np.float64)), quantile)) for n, w in weights.items()}


def mask_from_quantile(weights: Mapping[str, np.ndarray], quantile: float, scope: str = "global",
                       exclude: Iterable[str] = ()) -> Mask:
    """Prune non-excluded weights whose magnitude is below the `quantile` threshold.

    The threshold is a magnitude read off the stats.json table (computed over all prunable weights,
    excluded ones included), so the real sparsity may differ a little from `quantile`: record it
    with `mask_sparsity`.
    """
    thresholds = quantile_thresholds(weights, quantile, scope)
    skip = excluded_names(weights, exclude)
    return {n: (np.ones(np.shape(w), dtype=bool) if n in skip else np.abs(np.asarray(w)) >= thresholds[n])
            for n, w in weights.items()}


def prune_remaining(weights: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray], rate: float,
                    scope: str = "global", exclude: Iterable[str] = ()) -> Mask:
    """One IMP step: prune `rate` of the weights that `mask` still keeps (excluded layers untouched)."""
    rate = _check_fraction(rate, "rate")
    scope = _check_scope(scope)
    full = _full_base(weights, mask)
    candidates = set(weights) - excluded_names(weights, exclude)
    if scope == "global":
        counts: Any = _round_count(rate, sum(int(np.count_nonzero(full[n])) for n in candidates))
    else:
        counts = {n: _round_count(rate, int(np.count_nonzero(full[n]))) for n in candidates}
    return _prune(weights, full, counts, scope, candidates)


def _name_seed(seed: int, name: str) -> np.random.Generator:
    # Per-layer stream from (seed, name): independent of dict order and of the other layers.
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def random_mask_like(mask: Mapping[str, np.ndarray], seed: int) -> Mask:
    """Same shape and kept count per entry as `mask`, positions drawn at random (the control)."""
    out: Mask = {}
    for name, entry in mask.items():
        entry = np.asarray(entry, dtype=bool)
        out[name] = _name_seed(seed, name).permutation(entry.ravel()).reshape(entry.shape)
    return out


def mask_sparsity(mask: Mapping[str, np.ndarray], shapes: Mapping[str, Iterable[int]] | None = None) -> dict:
    """Real sparsity over every masked weight and per layer.

    `shapes` (weight shapes by name) is needed only for entries that broadcast (structured masks).
    """
    layers = {}
    total = pruned = 0
    for name, entry in mask.items():
        entry = np.asarray(entry, dtype=bool)
        shape = tuple(shapes[name]) if shapes is not None and name in shapes else entry.shape
        full_size = int(np.prod(shape, dtype=np.int64))
        if entry.shape != shape:
            entry = expand(entry, shape)
        n_pruned = int(full_size - np.count_nonzero(entry))
        layers[name] = {"total": full_size, "pruned": n_pruned,
                        "sparsity": n_pruned / full_size if full_size else 0.0}
        total += full_size
        pruned += n_pruned
    return {"overall": pruned / total if total else 0.0, "total": total, "pruned": pruned,
            "remaining": total - pruned, "layers": layers}
