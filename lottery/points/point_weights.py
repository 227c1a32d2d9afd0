"""A grid point's final network on disk: `<grid>/models/<task_id>.keras`, for work after training.

Robustness evaluation (lottery.points.robustness) and quantisation read a point's trained network
from here instead of retraining it. The file is a plain Keras model (no optimizer: the masked
optimizer's class is not registered for deserialisation), saved atomically by the point's runner
BEFORE the scheduler writes the point's result, so a result file implies the model file for every
point trained since this module exists. Structured points keep their compacted model under the same
name (lottery.points.structured.save_model writes GridPaths.compact_model, the same path).
Pruned weights are stored as exact zeros, so the model is the masked network as evaluated.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.atomic import atomic_path
from common.paths import GridPaths


def point_model_path(grid_dir: str | os.PathLike, task_id: str) -> Path:
    return GridPaths(Path(grid_dir)).compact_model(task_id)


def save_point_weights(grid_dir: str | os.PathLike, task_id: str, model) -> Path:
    """Save `model` (the point's final network) as models/<task_id>.keras, atomically."""
    import keras

    path = point_model_path(grid_dir, task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = keras.Model.from_config(model.get_config())
    plain.set_weights(model.get_weights())
    with atomic_path(path, ".keras") as tmp:  # Keras insists on the suffix
        plain.save(str(tmp))
    return path


def has_point_weights(grid_dir: str | os.PathLike, task_id: str) -> bool:
    return point_model_path(grid_dir, task_id).is_file()


def load_point_model(grid_dir: str | os.PathLike, task_id: str):
    """The point's final network (uncompiled); FileNotFoundError naming the file when the point
    was trained before final networks were kept (retrain it: delete its result file)."""
    import keras

    path = point_model_path(grid_dir, task_id)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: point {task_id} has no saved network (trained before "
                                f"points kept theirs; delete results/{task_id}.json to retrain it)")
    return keras.models.load_model(str(path), compile=False, safe_mode=True)
