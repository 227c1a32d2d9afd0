"""Channel (filter / neuron) importance criteria for structured pruning, NumPy only.

A layer's filters are the slices of its kernel along the output-channel axis: the last axis of a
Dense kernel (in, out) or a Conv2D kernel (kh, kw, in, out); the input-channel axis (2) of a
DepthwiseConv2D kernel (kh, kw, channels, 1). Every criterion gives one score per channel; the
LOWEST scores are pruned first.

- `l1`, `l2`: the filter's L1 / L2 norm (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
- `fpgm`: the sum of Euclidean distances from the filter to every other filter of its layer
  (He et al. 2019). The filters nearest the layer's geometric median have the smallest sum: the
  rest of the layer can best replace them, so they go first, whatever their norm.
- `bn`: |gamma| of the BatchNorm that follows the layer (Liu et al. 2017, network slimming).
"""
from __future__ import annotations

import numpy as np

from common.ranking import bn_scores, keep_mask  # noqa: F401  (part of this module's API)

CRITERIA = ("l1", "l2", "fpgm", "bn")
WEIGHT_CRITERIA = ("l1", "l2", "fpgm")


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return criterion


def filter_matrix(kernel: np.ndarray, channel_axis: int = -1) -> np.ndarray:
    """(channels, everything else): one row per filter, in float64 for stable distances."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim < 1:
        raise ValueError("a kernel needs at least one axis")
    moved = np.moveaxis(kernel, channel_axis, 0)
    return moved.reshape(moved.shape[0], -1)


def filter_scores(kernel: np.ndarray, criterion: str, channel_axis: int = -1) -> np.ndarray:
    """One score per channel of `kernel` under a weight criterion (l1, l2 or fpgm)."""
    if criterion not in WEIGHT_CRITERIA:
        raise ValueError(f"filter_scores takes a weight criterion {WEIGHT_CRITERIA}, got {criterion!r}"
                         + (" (bn scores come from BatchNorm gammas: bn_scores)" if criterion == "bn" else ""))
    rows = filter_matrix(kernel, channel_axis)
    if criterion == "l1":
        return np.abs(rows).sum(axis=1)
    if criterion == "l2":
        return np.sqrt(np.square(rows).sum(axis=1))
    return _distance_sums(rows)


def _distance_sums(rows: np.ndarray) -> np.ndarray:
    """sum_j ||r_i - r_j|| for every i, via the Gram matrix (O(n^2) memory in channels only)."""
    squares = np.square(rows).sum(axis=1)
    gram = rows @ rows.T
    distances = np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2.0 * gram, 0.0))
    np.fill_diagonal(distances, 0.0)
    return distances.sum(axis=1)
