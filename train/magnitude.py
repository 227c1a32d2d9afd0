"""Magnitude masks and mask files: the pure NumPy maths shared by gradual pruning during dense
training (`train.gmp`) and the lottery stage (`lottery.prune.masks`, which re-exports every name).

A mask is a `dict[str, np.ndarray]` of booleans keyed by Keras variable path; True keeps a weight,
False prunes it. An entry may be any boolean array that broadcasts to its weight (structured
masks); `expand` gives the full-shape view. Ties in magnitude are broken by position (sorted
weight name, then flat index), so a requested sparsity prunes exactly round(sparsity * n) weights
and the same input always gives the same mask. Mask files are .npz archives of boolean arrays plus
a JSON `__meta__` entry, read without pickle.
"""
from __future__ import annotations

import fnmatch
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from common.atomic import atomic_output

Mask = dict[str, np.ndarray]
SCOPES = ("global", "layer")
META_KEY = "__meta__"
# A mask file is read whole into memory: load_mask refuses, by default, anything whose
# uncompressed size exceeds this.
MAX_MASK_BYTES = 4 << 30


# ----------------------------------------------------------------------------------------- helpers
def _round_count(fraction: float, n: int) -> int:
    """round(fraction * n), halves up (Python's round() would pick the even neighbour)."""
    return int(np.floor(fraction * n + 0.5))


def _check_fraction(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or np.isnan(value):
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return value


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


def check_name(name: str) -> str:
    """Weight names become archive member names: refuse anything that could escape or collide."""
    if (not isinstance(name, str) or not name or name.startswith(("/", "__")) or "\x00" in name
            or "\\" in name or any(part in ("", ".", "..") for part in name.split("/"))):
        raise ValueError(f"invalid weight name {name!r}")
    return name


def expand(entry: np.ndarray, shape: Iterable[int]) -> np.ndarray:
    """The full-shape (read-only, broadcast) view of a mask entry."""
    shape = tuple(shape)
    try:
        return np.broadcast_to(np.asarray(entry, dtype=bool), shape)
    except ValueError:
        raise ValueError(f"mask entry of shape {np.shape(entry)} does not broadcast to weight shape {shape}") from None


def layer_of(name: str) -> str:
    """The layer part of a variable path: 'lenet/fc1/kernel' -> 'fc1'."""
    parts = name.split("/")
    return parts[-2] if len(parts) >= 2 else parts[0]


def excluded_names(names: Iterable[str], exclude: Iterable[str] = ()) -> set[str]:
    """Names matched by any pattern (fnmatch on the full path or on the layer name).

    A pattern that matches nothing is an error: a typo would otherwise silently prune the classifier.
    """
    names = list(names)
    out: set[str] = set()
    for pattern in exclude:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(layer_of(n), pattern)}
        if not hits:
            raise ValueError(f"exclude pattern {pattern!r} matches no prunable weight (have: {sorted(names)})")
        out |= hits
    return out


def ones_like(weights: Mapping[str, np.ndarray]) -> Mask:
    """The dense mask: keeps every weight."""
    return {n: np.ones(np.shape(w), dtype=bool) for n, w in weights.items()}


def _full_base(weights: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray] | None) -> Mask:
    if base is None:
        return ones_like(weights)
    missing = set(weights) - set(base)
    extra = set(base) - set(weights)
    if missing or extra:
        raise ValueError(f"mask and weights disagree: missing {sorted(missing)}, unknown {sorted(extra)}")
    return {n: expand(base[n], np.shape(w)).copy() for n, w in weights.items()}


def _prune_lowest(scores: np.ndarray, alive: np.ndarray, k: int) -> np.ndarray:
    """Switch off the k alive positions of lowest score; ties go to the lower index (stable sort)."""
    alive_idx = np.flatnonzero(alive)
    if k > alive_idx.size:
        raise ValueError(f"cannot prune {k} weights: only {alive_idx.size} remain")
    keep = alive.copy()
    if k > 0:
        order = np.argsort(scores[alive_idx], kind="stable")
        keep[alive_idx[order[:k]]] = False
    return keep


def _prune(weights: Mapping[str, np.ndarray], base: Mask, counts: Mapping[str, int] | int,
           scope: str, candidates: set[str]) -> Mask:
    """Prune `counts` more weights (one int for global scope, per name for layer scope)."""
    result = dict(base)
    names = sorted(candidates)
    if not names:
        return result
    if scope == "global":
        scores = np.concatenate([np.abs(np.asarray(weights[n], dtype=np.float64)).ravel() for n in names])
        alive = np.concatenate([base[n].ravel() for n in names])
        keep = _prune_lowest(scores, alive, int(counts))
        offset = 0
        for n in names:
            size = base[n].size
            result[n] = keep[offset:offset + size].reshape(base[n].shape)
            offset += size
    else:
        for n in names:
            scores = np.abs(np.asarray(weights[n], dtype=np.float64)).ravel()
            result[n] = _prune_lowest(scores, base[n].ravel(), int(counts[n])).reshape(base[n].shape)
    return result


# ------------------------------------------------------------------------------------ mask makers
def magnitude_mask(weights: Mapping[str, np.ndarray], sparsity: float, scope: str = "global",
                   exclude: Iterable[str] = (), base: Mapping[str, np.ndarray] | None = None) -> Mask:
    """Prune the smallest-magnitude weights until `sparsity` of the non-excluded weights are pruned.

    scope 'global': one threshold over all non-excluded weights; 'layer': the same fraction in each.
    `base`: an existing mask whose pruned weights stay pruned and count towards the sparsity.
    """
    sparsity = _check_fraction(sparsity, "sparsity")
    scope = _check_scope(scope)
    full = _full_base(weights, base)
    candidates = set(weights) - excluded_names(weights, exclude)

    def extra(names: Iterable[str]) -> int:
        names = list(names)
        total = sum(full[n].size for n in names)
        already = sum(int(full[n].size - np.count_nonzero(full[n])) for n in names)
        more = _round_count(sparsity, total) - already
        if more < 0:
            raise ValueError(f"base mask is already sparser ({already}/{total}) than sparsity {sparsity}")
        return more

    counts = extra(candidates) if scope == "global" else {n: extra([n]) for n in candidates}
    return _prune(weights, full, counts, scope, candidates)


# ------------------------------------------------------------------------------------------- files
def save_mask(path: str | os.PathLike, mask: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> None:
    """Write an .npz of boolean arrays keyed by weight name, plus JSON metadata; atomic, no pickle."""
    arrays = {}
    for name, entry in mask.items():
        arrays[check_name(name)] = np.asarray(entry, dtype=bool)
    try:
        meta_text = json.dumps(dict(meta or {}), sort_keys=True)
    except TypeError as err:
        raise ValueError(f"mask metadata for {path} must be JSON-serialisable: {err}") from None
    arrays[META_KEY] = np.array(meta_text)  # a 0-d unicode array: loads without pickle
    with atomic_output(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_mask(path: str | os.PathLike, max_bytes: int = MAX_MASK_BYTES) -> tuple[Mask, dict]:
    """Read a mask file written by save_mask: (mask, meta). Refuses pickles and archives that
    expand to more than `max_bytes`."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            size = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path}: not a readable mask file ({err})") from None
    if size > max_bytes:
        raise ValueError(f"{path}: mask archive expands to {size} bytes, over the limit of {max_bytes}")
    mask: Mask = {}
    meta: dict = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                if key == META_KEY:
                    meta = json.loads(str(data[key]))
                    continue
                check_name(key)  # before reading: a hostile name never gets further
                value = data[key]
                if value.dtype != np.bool_:
                    raise ValueError(f"{path}: entry {key!r} has dtype {value.dtype}, expected bool")
                mask[key] = value
    except (ValueError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path}: {err}") from None
    return mask, meta
