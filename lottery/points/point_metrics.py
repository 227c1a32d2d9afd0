"""What a retrained grid point reports beyond its top-1 accuracy: top-5 accuracy, BatchNorm
recalibration after retraining under its mask, and the chance-level check.

Fields added to a point's result (lottery.points.recipe.retrain):
- `top5_accuracy` (final epoch) and `best_top5_accuracy` (the largest over epochs), for
  datasets of more than 5 classes (train.metrics; absent otherwise);
- `bn_recalibrated` (bool) and, when true, `accuracy_before_bn_recalibration` and
  `bn_recalibration_batches`: the point's BatchNorm statistics recomputed from training batches
  (train.bn_recalibration) once retraining ends; `accuracy`, `loss`, `top5_accuracy` are then
  those after it, and `best_accuracy` / `best_top5_accuracy` include it (as the last epoch's);
- `val_at_chance` (bool) and `chance_warning` (text or None): train.chance_check on the final
  validation accuracy against the last epoch's training accuracy.
"""
from __future__ import annotations

from typing import Any, Mapping

from train.bn_recalibration import bn_layers, point_policy, recalibrate_point
from train.chance_check import point_fields
from train.metrics import TOP5

# Grid settings that set a point's recalibration (absent from grids planned before them).
GRID_DEFAULTS = {"bn_recalibration": "auto", "bn_recalibration_batches": 20}


def recalibration_options(grid_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Recipe fields of the grid's bn_recalibration settings (defaults when absent)."""
    grid_settings = grid_settings or {}
    return {k: grid_settings.get(k) if grid_settings.get(k) is not None else v
            for k, v in GRID_DEFAULTS.items()}


def _validation_records(data, batch_size: int | None) -> int:
    if isinstance(data, tuple):
        return len(data[1])
    return sum(int(y.shape[0]) for _, y, *rest in data)


def finish_point(model, history: Mapping[str, list[float]], recipe, label: str) -> dict[str, Any]:
    """The result fields above (overriding recipe.retrain's accuracy and loss when recalibrated)."""
    val_acc = list(history["val_accuracy"])
    out: dict[str, Any] = {}
    top5 = list(history.get(f"val_{TOP5}", []))
    recalibrated = point_policy(recipe.bn_recalibration, model)
    if recalibrated:
        last = recipe.epochs - 1
        # The last epoch's validation metrics are those before (same weights, same statistics).
        r = recalibrate_point(model, recipe.train_data, recipe.validation_data, epoch=last,
                              batches=recipe.bn_recalibration_batches, batch_size=recipe.batch_size,
                              evaluate_before=False)
        after = r["after"]
        out.update({"accuracy_before_bn_recalibration": float(val_acc[-1]),
                    "bn_recalibration_batches": r["batches"],
                    "accuracy": float(after["accuracy"]), "loss": float(after["loss"])})
        if TOP5 in after:
            out[TOP5] = float(after[TOP5])
            top5 = top5[:-1] + [out[TOP5]] if top5 else [out[TOP5]]
        val_acc[-1] = out["accuracy"]   # the last epoch's model is the recalibrated one
        best = max(range(len(val_acc)), key=lambda i: (val_acc[i], -i))
        out.update({"best_accuracy": float(val_acc[best]), "epochs_to_best": best + 1})
    out["bn_recalibrated"] = recalibrated
    if top5:
        out.setdefault(TOP5, float(top5[-1]))
        out["best_top5_accuracy"] = float(max(top5))
    final = out.get("accuracy", float(val_acc[-1]))
    train_acc = history.get("accuracy", [None])[-1]
    num_classes = int(model.outputs[0].shape[-1])
    # Counting validation records costs a pass: only near chance, where the check needs it.
    if train_acc is not None and final <= 1.0 / num_classes + 0.15:
        n_val = _validation_records(recipe.validation_data, recipe.batch_size)
        out.update(point_fields(final, float(train_acc), num_classes, n_val,
                                has_batchnorm=bool(bn_layers(model)), recalibrated=recalibrated,
                                label=label))
    else:
        out.update({"val_at_chance": False, "chance_warning": None})
    return out
