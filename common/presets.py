"""Named experiment presets: the settings of a published recipe, for the dense run and its grid.

`bigticket train dense --preset NAME` and `bigticket lottery plan --preset NAME` start from the
preset's values; a `--config` file and command-line flags override them (the dataset, `--data`, is
never part of a preset).

- `early-bird-resnet20`: You et al. 2020, "Drawing Early-Bird Tickets" on CIFAR: ResNet-20 trained
  160 epochs with SGD (lr 0.1, divided by 10 at epochs 80 and 120), an L1 penalty on BatchNorm scales
  (network slimming), the Early-Bird detector on; channel masks drawn at epochs 10, 30, 50 and 100 and
  at the detected Early-Bird epoch, pruned at 30% and 50% of channels by BN scale (one global
  threshold), each compacted and retrained.
"""
from __future__ import annotations

import copy
from typing import Any

from common.settings import did_you_mean

STAGES = ("dense", "grid")

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "early-bird-resnet20": {
        "dense": {
            "model": "resnet20",
            "epochs": 160,
            "lr": 0.1,
            "lr_schedule": "step",
            "lr_decay_epochs": [80, 120],
            "lr_decay_factor": 0.1,
            "optimizer": "sgd",
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "bn_l1": 1e-4,
            "early_bird": True,
            "rewind": ["10ep", "30ep", "50ep", "100ep"],
        },
        "grid": {
            "channel_ratios": [0.3, 0.5],
            "criterion": "bn",   # with its default scope: one global threshold (network slimming)
            "draw": ["10ep", "30ep", "50ep", "100ep"],
            "early_bird": True,
        },
    },
}


def preset(name: str, stage: str) -> dict[str, Any]:
    """A fresh copy of preset `name`'s settings for `stage` ('dense' or 'grid')."""
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}{did_you_mean(name, PRESETS)} "
                         f"(known: {', '.join(sorted(PRESETS))})")
    if stage not in STAGES:
        raise ValueError(f"preset {name!r}: stage must be one of {STAGES}, got {stage!r}")
    return copy.deepcopy(PRESETS[name][stage])
