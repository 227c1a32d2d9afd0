"""Schedules over training time: the learning rate at a (fractional) epoch.

Pure maths on the settings: the dense driver, the Elephas rounds and the retraining of grid points
(which replays the dense schedule from a rewind point) all read the rate from here.
"""
from __future__ import annotations

import math

from train.settings import DenseSettings


def lr_at(settings: DenseSettings, epoch: float) -> float:
    """Learning rate at (fractional) epoch `epoch`: linear warm-up, then the schedule."""
    base, warm = settings.lr, settings.warmup_epochs
    if warm > 0 and epoch < warm:
        return base * (epoch + 1) / (warm + 1)  # never 0 at the first step
    if settings.lr_schedule == "cosine":
        span = max(settings.epochs - warm, 1e-9)
        return 0.5 * base * (1 + math.cos(math.pi * min(1.0, (epoch - warm) / span)))
    if settings.lr_schedule == "step":
        drops = sum(1 for e in settings.lr_decay_epochs if epoch >= e)
        return base * settings.lr_decay_factor ** drops
    return base
