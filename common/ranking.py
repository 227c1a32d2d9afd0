"""Channel ranking shared by dense training (Early-Bird detection) and structured pruning.

NumPy only. A channel's score says how much it matters; the lowest scores are pruned first.
"""
from __future__ import annotations

import numpy as np


def bn_scores(gamma: np.ndarray) -> np.ndarray:
    """|gamma| of a BatchNorm scale, the network-slimming criterion (Liu et al. 2017)."""
    return np.abs(np.asarray(gamma, dtype=np.float64)).reshape(-1)


def keep_mask(scores: np.ndarray, ratio: float, *, min_keep: int = 1) -> np.ndarray:
    """True for the channels kept when the fraction `ratio` with the lowest scores is pruned.

    round(ratio * n) channels go (halves up), never leaving fewer than `min_keep`; ties are broken
    by position (the earlier channel goes first) so the same scores always give the same mask.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0 or np.isnan(ratio):
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if np.isnan(scores).any():
        raise ValueError("channel scores contain NaN (diverged weights?)")
    n = scores.size
    pruned = min(int(np.floor(ratio * n + 0.5)), max(n - min_keep, 0))
    order = np.lexsort((np.arange(n), scores))  # by score, then by index
    keep = np.ones(n, dtype=bool)
    keep[order[:pruned]] = False
    return keep
