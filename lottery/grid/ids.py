"""Identifiers of a grid's tasks and masks, and the per-task seeds derived from them.

Ids become file names (results/<task_id>.json, masks/<mask_id>.npz), so every id built here is a
safe file name (common.paths.is_safe_name). Fractions enter ids as 4-digit tags: settings are
validated with the same `fraction_tag`, and `lottery.grid.plan.plan` refuses two values that would
share an id.
"""
from __future__ import annotations

import zlib


def fraction_tag(value: float) -> str:
    """0.9 -> '9000': the fraction in ten-thousandths, as it appears in ids."""
    return f"{int(round(value * 10000)):04d}"


def mask_id(scope: str, kind: str, value: float) -> str:
    """e.g. global-s9000 (sparsity 0.9), layer-q5000 (quantile 0.5)."""
    return f"{scope}-{kind}{fraction_tag(value)}"


def channel_mask_id(criterion: str, scope: str, ratio: float, draw: str, round_to: int = 1) -> str:
    """e.g. channels-bn-global-c3000-10ep (30% of the channels, drawn at epoch 10); a rounded
    mask adds its multiple: channels-l1-layer-c5000-r16-10ep."""
    rounding = f"-r{round_to}" if round_to > 1 else ""
    return f"channels-{criterion}-{scope}-c{fraction_tag(ratio)}{rounding}-{draw}"


def random_mask_id(base: str, seed: int) -> str:
    return f"{base}-random{seed}"


def oneshot_task_id(mask: str, rewind: str, control: str) -> str:
    """e.g. oneshot-global-s9000-init-none: the threshold's mask (not its random twin's)."""
    return f"oneshot-{mask}-{rewind}-{control}"


def imp_task_id(scope: str, rounds: int, rate: float, rewind: str) -> str:
    """e.g. imp-global-r5-p2000-init: 5 rounds pruning 20% each, rewound to init."""
    return f"imp-{scope}-r{rounds}-p{fraction_tag(rate)}-{rewind}"


def structured_task_id(channel_mask: str) -> str:
    """channels-bn-global-c3000-10ep -> structured-bn-global-c3000-10ep (one task per mask)."""
    return "structured-" + channel_mask.removeprefix("channels-")


def variant_task_id(base: str, retrain_mode: str = "weights", replicate: int = 0) -> str:
    """A point's id with its retraining mode and replicate: the weights mode and replicate 0 keep
    `base` exactly (grids planned before either existed keep their ids and result files), e.g.
    oneshot-global-s9000-init-none-lr-rep2."""
    mode = "" if retrain_mode == "weights" else f"-{retrain_mode}"
    return f"{base}{mode}{replicate_suffix(replicate)}"


def replicate_suffix(replicate: int) -> str:
    return f"-rep{replicate}" if replicate else ""


def derived_seed(seed: int, name: str) -> int:
    """A per-task seed that is stable across runs and machines (hash() is salted per process)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)
