"""Named experiment presets: the settings of a published recipe, for the dense run and its grid.

`bigticket train dense --preset NAME` and `bigticket lottery plan --preset NAME` start from the
preset's values; a `--config` file and command-line flags override them (the dataset, `--data`, is
never part of a preset).

- `early-bird-resnet20`: You et al. 2020, "Drawing Early-Bird Tickets" on CIFAR: ResNet-20 trained
  160 epochs with SGD (lr 0.1, divided by 10 at epochs 80 and 120), an L1 penalty on BatchNorm scales
  (network slimming), the Early-Bird detector on; channel masks drawn at epochs 10, 30, 50 and 100 and
  at the detected Early-Bird epoch, pruned at 30% and 50% of channels by BN scale (one global
  threshold), each compacted and retrained.
- `super-resnet20`, `super-resnet44`: the compressed "super model" (gradual magnitude pruning then
  post-training quantisation). The CIFAR ResNet recipe of He et al. 2016 (160 epochs of SGD with
  momentum 0.9, lr 0.1 divided by 10 at epochs 80 and 120, weight decay 1e-4, batch 128, random
  crop and flip) with sparsity raised during training by Zhu & Gupta's (2017) polynomial schedule,
  s(t) = final + (initial - final) * (1 - (t - begin) / (end - begin)) ** 3, from 0 at the first
  step to 0.6 (ResNet-20) or 0.7 (ResNet-44) at the last, masks updated every 100 steps with one
  global magnitude threshold (the cubic flattens out at the end, so the last updates prune almost
  nothing and the network recovers while the rate anneals); then int8 quantisation to LiteRT
  (`bigticket quantize --preset ...`: full-integer int8 calibrated on train images, with
  dynamic-range int8 and float32 beside it for comparison). The reference reports ~1.8x smaller
  files after quantisation at no accuracy cost. Mixed precision is optional (`--mixed-precision`:
  float16 on GPUs, ~1.2x faster there, accuracy unchanged; bfloat16 on CPUs); quantisation always
  starts from a float32 rebuild of the network.
"""
from __future__ import annotations

import copy
from typing import Any

from common.settings import did_you_mean

STAGES = ("dense", "grid", "quantize")


def _super_model(model: str, final_sparsity: float) -> dict[str, dict[str, Any]]:
    return {
        "dense": {
            "model": model,
            "epochs": 160,
            "batch_size": 128,
            "lr": 0.1,
            "lr_schedule": "step",
            "lr_decay_epochs": [80, 120],
            "lr_decay_factor": 0.1,
            "optimizer": "sgd",
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "augment": "crop_flip",
            "gmp_schedule": "polynomial",
            "gmp_initial_sparsity": 0.0,
            "gmp_final_sparsity": final_sparsity,
            "gmp_begin_step": 0,
            "gmp_power": 3.0,
            "gmp_frequency": 100,
            "gmp_scope": "global",
        },
        "quantize": {"variants": ["float32", "dynamic_int8", "full_int8"]},
    }


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
    "super-resnet20": _super_model("resnet20", 0.6),
    "super-resnet44": _super_model("resnet44", 0.7),
}


def preset(name: str, stage: str) -> dict[str, Any]:
    """A fresh copy of preset `name`'s settings for `stage` ('dense' or 'grid')."""
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}{did_you_mean(name, PRESETS)} "
                         f"(known: {', '.join(sorted(PRESETS))})")
    if stage not in STAGES:
        raise ValueError(f"preset {name!r}: stage must be one of {STAGES}, got {stage!r}")
    return copy.deepcopy(PRESETS[name].get(stage, {}))  # a stage a preset leaves alone: defaults
