"""A real but cheap grid-point executor, for scheduler benchmarks and fault tests.

`sleep_point` sleeps for the task's params["duration"] (so a run measures scheduling, not
training), returns a result computed from the task (so a wrong task/result pairing is visible),
and records each COMPLETED execution as its own file under <grid>/../executions/ (so a point run
twice is counted twice). Optional params drive fault tests: `kill_once` SIGKILLs the process,
`stop_once` SIGSTOPs it, `fail` raises; the *_once faults fire only on the first attempt (a
marker file beside the grid). It does not watch the stop token: a point, once started, finishes.

    lottery run --grid DIR --executor lottery.grid.simulate:sleep_point
"""
from __future__ import annotations

import math
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.paths import GridPaths
from common.stop import StopToken
from lottery.grid.plan import write_plan
from lottery.points.task import Task

EXECUTOR = "lottery.grid.simulate:sleep_point"


def executions_dir(grid_dir) -> Path:
    return Path(grid_dir).parent / "executions"


def completed_executions(grid_dir) -> dict[str, int]:
    """task id -> how many times sleep_point ran it to the end."""
    counts: dict[str, int] = {}
    d = executions_dir(grid_dir)
    if d.is_dir():
        for p in d.iterdir():
            task_id = p.name.rsplit("@", 1)[0]
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def expected_accuracy(task: Task | Mapping[str, Any]) -> float:
    """A made-up smooth function of the point (a Task or its stored form), so reports have
    something to plot."""
    fields = task.to_dict() if isinstance(task, Task) else task
    rewind_bonus = {"init": 0.0, "final": -0.05}.get(fields.get("rewind"), 0.02)
    control_penalty = {"none": 0.0, "random_reinit": 0.1,
                       "random_mask": 0.15}[fields.get("control", "none")]
    s = 0.5 if fields.get("sparsity") is None else float(fields["sparsity"])
    return round(0.95 - 0.3 * s ** 4 + rewind_bonus - control_penalty * s, 6)


def _first_time(grid_dir, task: Task, what: str) -> bool:
    marker = Path(grid_dir).parent / f"{what}-{task.task_id}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def sleep_point(run_dir, grid_dir, task: Task, settings: Mapping[str, Any],
                stop: StopToken) -> dict[str, Any]:
    """The executor: func(run_dir, grid_dir, task, settings, stop) -> result."""
    params = task.params or {}
    if params.get("fail"):
        raise RuntimeError(f"workload asked to fail on {task.task_id}")
    if params.get("kill_once") and _first_time(grid_dir, task, "killed"):
        os.kill(os.getpid(), signal.SIGKILL)
    if params.get("stop_once") and _first_time(grid_dir, task, "stopped"):
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.perf_counter()
    time.sleep(float(params.get("duration", 0.0)))
    acc = expected_accuracy(task)
    epochs = task.epochs or 3
    # The result format of the real grid point: history as one row per epoch.
    history = [{"epoch": e + 1, "loss": round(1.0 / (e + 1), 6),
                "val_accuracy": round(acc * (1 - math.exp(-(e + 1))), 6)} for e in range(epochs)]
    result = {"accuracy": acc, "loss": round(1 - acc, 6), "sparsity": task.sparsity,
              "epochs_to_best": epochs, "time": time.perf_counter() - t0, "history": history,
              "pid": os.getpid()}
    if task.kind == "imp":
        fields = task.to_dict()
        rounds = []
        for r in range(1, task.imp_rounds + 1):
            s = 1 - (1 - task.imp_rate) ** r
            rounds.append({"round": r, "sparsity": s,
                           "accuracy": expected_accuracy({**fields, "sparsity": s})})
        result["rounds"] = rounds
    d = executions_dir(grid_dir)
    d.mkdir(exist_ok=True)
    (d / f"{task.task_id}@{uuid.uuid4().hex}").write_text(str(os.getpid()))
    return result


def make_sleep_grid(root, durations: Sequence[float], name: str = "lottery-test",
                    params: Mapping[int, Mapping[str, Any]] | None = None,
                    costs: Sequence[float] | None = None) -> GridPaths:
    """A planned grid of sleep points under root/dense-test/<name>/.

    Task i (id p000, p001, ...) sleeps durations[i]; its cost (what the plan orders by, longest
    first) is costs[i], by default its duration. `params` maps task index -> more params for
    sleep_point, e.g. {3: {"kill_once": True}}.
    """
    grid = GridPaths(Path(root) / "dense-test" / name)
    grid.root.mkdir(parents=True, exist_ok=True)
    costs = durations if costs is None else costs
    tasks = []
    for i, duration in enumerate(durations):
        tasks.append(Task(task_id=f"p{i:03d}", kind="oneshot", rewind="init", control="none",
                          sparsity=round(0.1 + 0.8 * i / max(1, len(durations) - 1), 4),
                          epochs=3, seed=i, cost=float(costs[i]),
                          params={"duration": float(duration), **(params or {}).get(i, {})}))
    tasks.sort(key=lambda t: (-t.cost, t.task_id))
    write_plan(grid, {"workload": "sleep"}, tasks)
    return grid
