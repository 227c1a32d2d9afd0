"""The runners of grid points by task kind, and `train_point`: what the scheduler calls for a task.

Every runner is called as runner(run_dir, grid_dir, task, settings, stop) and returns the point's
result (a JSON-able dict; the scheduler writes results/<task_id>.json, then deletes the point's
partial state). A new kind of point is one module with its runner, registered here.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from common.stop import StopToken
from lottery.points.gmp import run_gmp_task
from lottery.points.imp import run_imp_task
from lottery.points.oneshot import run_oneshot_task
from lottery.points.robustness import run_robustness_task
from lottery.points.structured import run_structured_task
from lottery.points.task import Task, TaskError
from train import adversarial

Runner = Callable[[str | os.PathLike, str | os.PathLike, Task, Mapping[str, Any] | None, StopToken | None],
                  dict[str, Any]]

RUNNERS: dict[str, Runner] = {
    "oneshot": run_oneshot_task,
    "imp": run_imp_task,
    "structured": run_structured_task,
    "robustness": run_robustness_task,  # a trained point under attack (robustness grids)
    "gmp": run_gmp_task,  # gradual magnitude pruning while retraining (lottery.points.gmp)
}


def train_point(run_dir: str | os.PathLike, grid_dir: str | os.PathLike, task: Task,
                settings: Mapping[str, Any] | None = None, stop: StopToken | None = None) -> dict[str, Any]:
    """Run one task of the grid `grid_dir` (under the dense run `run_dir`) with the runner of its
    kind; returns its result. `settings`: the grid's settings; `stop`: a common.stop.StopToken
    that stops the training after its current batch (common.stop.Preempted)."""
    runner = RUNNERS.get(task.kind)
    if runner is None:
        raise TaskError(f"task {task.task_id!r}: field kind is {task.kind!r}, which no runner trains "
                        f"(known: {', '.join(sorted(RUNNERS))})")
    attack = adversarial.config_from(settings or {})  # the grid's adversarial retraining
    if attack is None or task.kind == "robustness":
        return runner(run_dir, grid_dir, task, settings, stop)
    with adversarial.retraining(attack):
        result = runner(run_dir, grid_dir, task, settings, stop)
    return {**result, "adversarial_training": adversarial.describe(attack)}
