"""The robustness task: one trained network of a grid (a point, or the dense model) evaluated under
one attack at one epsilon on the dense run's whole validation split.

Robustness tasks live in a robustness grid, a sub-directory of the lottery grid
(`<grid>/robustness-<hash>/`, planned by lottery.grid.robustness_plan), and are run by the same
scheduler as training points (`bigticket lottery run --grid <grid>/robustness-<hash>`, under MPI
or job arrays); the presence of results/<task_id>.json means done, so a re-run computes only what
is missing. A task of kind "robustness" carries in `params`:

    target    the point's task id in the lottery grid, or "dense" (the dense run's model.keras)
    epsilon   L-inf radius on the [0, 1] image scale (train.attacks)

and the robustness grid's settings hold the attack (train.attacks.AttackConfig fields but the
epsilon) and the evaluation batch size. The result copies the point's identity (control, rewind,
sparsity, replicate, retrain mode, ...) from the point's result, so the report needs no join.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from common.atomic import read_json
from common.paths import GridPaths
from common.stop import StopToken
from lottery.points.point_weights import load_point_model
from lottery.points.recipe import open_dense_run
from lottery.points.task import Task, TaskError
from train.attacks import AttackConfig, attack_config, robust_accuracy
from train.data import make_dataset, open_dataset

log = logging.getLogger(__name__)

DENSE_TARGET = "dense"
# Copied from the point's result into the robustness result (those it has).
POINT_FIELDS = ("kind", "control", "rewind", "mask_id", "base_mask_id", "scope", "threshold",
                "target_sparsity", "sparsity", "replicate", "retrain_mode", "imp_rounds", "ratio",
                "criterion", "accuracy", "top5_accuracy")


def task_attack(task: Task, settings: Mapping[str, Any] | None) -> tuple[str, AttackConfig, int | None]:
    """(target, attack at the task's epsilon, evaluation batch size) of a robustness task."""
    params = dict(task.params or {})
    if "target" not in params or "epsilon" not in params:
        raise TaskError(f"task {task.task_id!r}: field params needs target and epsilon "
                        f"(a robustness task)")
    attack = dict((settings or {}).get("attack") or {})
    try:
        config = attack_config({**attack, "epsilon": float(params["epsilon"])})
    except (TypeError, ValueError) as err:
        raise TaskError(f"task {task.task_id!r}: attack settings: {err}") from None
    return str(params["target"]), config, (settings or {}).get("batch_size")


def _point_identity(lottery_grid: GridPaths, target: str) -> dict[str, Any]:
    if target == DENSE_TARGET:
        return {"kind": "dense", "control": "dense", "sparsity": 0.0, "target_sparsity": 0.0}
    path = lottery_grid.result(target)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: point {target} has no result (not trained yet)")
    result = read_json(path).get("result", {})
    return {k: result[k] for k in POINT_FIELDS if k in result}


def run_robustness_task(run_dir: str | os.PathLike, grid_dir: str | os.PathLike, task: Task,
                        settings: Mapping[str, Any] | None = None, stop: StopToken | None = None
                        ) -> dict[str, Any]:
    """Evaluate one (network, epsilon) of a robustness grid; returns its result (the scheduler
    writes the file). `run_dir` is ignored: the lottery grid is grid_dir's parent, the dense
    run the lottery grid's parent."""
    import keras

    from train.local_engine import configure_tensorflow

    target, config, batch_size = task_attack(task, settings)
    lottery_grid = GridPaths(Path(grid_dir).resolve().parent)
    run = open_dense_run(lottery_grid.root.parent)
    configure_tensorflow(run.settings)  # as a training point: the rank's pinned GPU
    identity = _point_identity(lottery_grid, target)
    if stop is not None:
        stop.raise_if_requested(f"before {task.task_id}")
    if target == DENSE_TARGET:
        model = keras.models.load_model(str(run.paths.model), compile=False, safe_mode=True)
    else:
        model = load_point_model(lottery_grid.root, target)
    s = run.settings
    info = open_dataset(s.data)
    data = make_dataset(info, "validation", batch_size=int(batch_size or s.batch_size),
                        training=False, input_size=s.input_size, fmt=s.format, cache=False)
    t0 = time.perf_counter()
    measured = robust_accuracy(model, data, [config.epsilon], config)[config.epsilon]
    log.info("%s: %s eps %.4g -> accuracy %.4f on %d examples (%.1fs)", task.task_id, config.attack,
             config.epsilon, measured["accuracy"], measured["examples"], time.perf_counter() - t0)
    return {"task_id": task.task_id, "target": target, "point": identity,
            "epsilon": config.epsilon, "attack": config.describe(),
            "robust_accuracy": measured["accuracy"], "robust_loss": measured["loss"],
            "examples": measured["examples"], "attack_seconds": measured["seconds"],
            "wall_time_s": time.perf_counter() - t0}
