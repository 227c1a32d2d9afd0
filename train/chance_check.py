"""No silent chance-level run: a warning that names the likely cause when validation accuracy sits
at chance while training accuracy is well above it.

Chance is 1 / classes. "At chance": |val_accuracy - chance| <= tolerance, with tolerance
3 * sqrt(chance * (1 - chance) / n_val) + 0.01: three binomial standard deviations of a random
guesser's accuracy on n_val validation records (a constant guess scores its class's frequency,
inside that band for roughly balanced splits), plus a point of slack. "Well above":
train_accuracy >= chance + max(0.15, 2 * tolerance). Both are flags in the history
(`val_at_chance` per epoch, 1.0/0.0) and in a grid point's result (`val_at_chance`,
`chance_warning`), and a WARNING log line names the likely cause.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from train.hooks import EpochHook, LoopState

log = logging.getLogger(__name__)

MIN_TRAIN_MARGIN = 0.15


def tolerance(num_classes: int, n_val: int) -> float:
    chance = 1.0 / num_classes
    return 3.0 * math.sqrt(chance * (1.0 - chance) / max(int(n_val), 1)) + 0.01


def at_chance(val_accuracy: float | None, train_accuracy: float | None, num_classes: int,
              n_val: int) -> bool:
    """Validation at chance while training is well above it (module docstring)."""
    if val_accuracy is None or train_accuracy is None or num_classes < 2:
        return False
    if math.isnan(val_accuracy) or math.isnan(train_accuracy):
        return False
    chance, tol = 1.0 / num_classes, tolerance(num_classes, n_val)
    return (abs(val_accuracy - chance) <= tol
            and train_accuracy >= chance + max(MIN_TRAIN_MARGIN, 2 * tol))


def likely_cause(has_batchnorm: bool, *, recalibrated: bool, workers: int = 1,
                 momentum: float | None = None, steps_per_epoch: int | None = None,
                 masked: bool = False) -> str:
    if not has_batchnorm:
        return ("the model has no BatchNorm, so look for a train/validation mismatch: labels or "
                "preprocessing that differ between the splits, or a validation split of one class")
    if recalibrated:
        return ("BatchNorm statistics were recalibrated and validation is still at chance: the "
                "network may rely on batch statistics (very small batches), or the splits differ")
    parts = []
    if momentum is not None and steps_per_epoch:
        parts.append(f"momentum {momentum:g} averages ~{1 / (1 - momentum):.0f} steps, against "
                     f"{steps_per_epoch} steps per epoch")
    if workers > 1:
        parts.append(f"averaging {workers} workers' weights mixes their statistics")
    if masked:
        parts.append("the pruning mask changed every activation downstream")
    detail = f" ({'; '.join(parts)})" if parts else ""
    return (f"stale BatchNorm moving statistics{detail}: set bn_recalibration to on (or auto), "
            f"or a smaller model_options.bn_momentum")


def message(val_accuracy: float, train_accuracy: float, num_classes: int, n_val: int,
            cause: str) -> str:
    return (f"validation accuracy {val_accuracy:.3f} is at chance (1/{num_classes} = "
            f"{1 / num_classes:.3f} +- {tolerance(num_classes, n_val):.3f} on {n_val} records) "
            f"while training accuracy is {train_accuracy:.3f}; likely cause: {cause}")


class ChanceCheck(EpochHook):
    """Flags each epoch's row (`val_at_chance`) and warns while validation sits at chance."""

    def __init__(self, num_classes: int, n_val: int, cause: str):
        self.num_classes, self.n_val, self.cause = int(num_classes), int(n_val), cause

    def on_epoch_end(self, epoch: int, row: dict[str, float], state: LoopState) -> bool:
        flagged = at_chance(row.get("val_accuracy"), row.get("accuracy"), self.num_classes,
                            self.n_val)
        row["val_at_chance"] = 1.0 if flagged else 0.0
        if flagged and state.chief:
            log.warning("epoch %d: %s", epoch, message(row["val_accuracy"], row["accuracy"],
                                                       self.num_classes, self.n_val, self.cause))
        return False


def dense_chance_check(settings, info, steps_per_epoch: int, recalibrating: bool) -> ChanceCheck:
    from train.models import DEFAULT_BN_MOMENTUM, has_batchnorm

    bn = has_batchnorm(settings.model)
    momentum = float(settings.model_options.get("bn_momentum", DEFAULT_BN_MOMENTUM)) if bn else None
    cause = likely_cause(bn, recalibrated=recalibrating,
                         workers=settings.workers if settings.engine == "elephas" else 1,
                         momentum=momentum, steps_per_epoch=steps_per_epoch)
    return ChanceCheck(info.num_classes, info.records["validation"], cause)


def point_fields(val_accuracy: float, train_accuracy: float | None, num_classes: int,
                 n_val: int, *, has_batchnorm: bool, recalibrated: bool,
                 label: str = "point") -> dict[str, Any]:
    """A grid point's `val_at_chance` and `chance_warning` (None when healthy); logs a warning."""
    if not at_chance(val_accuracy, train_accuracy, num_classes, n_val):
        return {"val_at_chance": False, "chance_warning": None}
    text = message(val_accuracy, train_accuracy, num_classes, n_val,
                   likely_cause(has_batchnorm, recalibrated=recalibrated, masked=True))
    log.warning("%s: %s", label, text)
    return {"val_at_chance": True, "chance_warning": text}
