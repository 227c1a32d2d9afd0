"""A real but cheap grid-point workload for scheduler tests and the scaling benchmark.

It sleeps for the task's `duration` (so the test measures scheduling, not training), returns a
result computed from the task (so a wrong task/result pairing is visible), and records each
COMPLETED execution as its own file under <grid>/../executions/ (so a point run twice is counted
twice). Optional task fields drive fault tests: `kill_once` SIGKILLs the process, `stop_once`
SIGSTOPs it, `fail` raises; the *_once faults fire only on the first attempt (marker file).
"""
from __future__ import annotations

import math
import os
import signal
import time
import uuid
from pathlib import Path


def executions_dir(grid_dir) -> Path:
    return Path(grid_dir).parent / "executions"


def completed_executions(grid_dir) -> dict[str, int]:
    counts: dict[str, int] = {}
    d = executions_dir(grid_dir)
    if d.is_dir():
        for p in d.iterdir():
            task_id = p.name.rsplit("@", 1)[0]
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def expected_accuracy(task: dict) -> float:
    """A made-up smooth function of the point, so reports have something to plot."""
    rewind_bonus = {"init": 0.0, "final": -0.05}.get(task.get("rewind"), 0.02)
    control_penalty = {"none": 0.0, "random_reinit": 0.1, "random_mask": 0.15}[task.get("control", "none")]
    s = float(task.get("sparsity", 0.5))
    return round(0.95 - 0.3 * s ** 4 + rewind_bonus - control_penalty * s, 6)


def _once(grid_dir, task: dict, what: str) -> bool:
    marker = Path(grid_dir).parent / f"{what}-{task['task_id']}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def sleep_point(run_dir, grid_dir, task: dict, settings: dict) -> dict:
    if task.get("fail"):
        raise RuntimeError(f"workload asked to fail on {task['task_id']}")
    if task.get("kill_once") and _once(grid_dir, task, "killed"):
        os.kill(os.getpid(), signal.SIGKILL)
    if task.get("stop_once") and _once(grid_dir, task, "stopped"):
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.perf_counter()
    time.sleep(float(task.get("duration", 0.0)))
    acc = expected_accuracy(task)
    epochs = int(task.get("epochs", 3))
    # The result format of lottery.points.oneshot.train_point: history as one row per epoch.
    history = [{"epoch": e + 1, "loss": round(1.0 / (e + 1), 6),
                "val_accuracy": round(acc * (1 - math.exp(-(e + 1))), 6)} for e in range(epochs)]
    result = {"accuracy": acc, "loss": round(1 - acc, 6), "sparsity": task.get("sparsity"),
              "epochs_to_best": epochs, "time": time.perf_counter() - t0, "history": history,
              "pid": os.getpid()}
    if task.get("kind") == "imp":
        rounds = []
        for r in range(1, int(task["imp_rounds"]) + 1):
            s = 1 - (1 - task["imp_rate"]) ** r
            rounds.append({"round": r, "sparsity": s,
                           "accuracy": expected_accuracy({**task, "sparsity": s})})
        result["rounds"] = rounds
    d = executions_dir(grid_dir)
    d.mkdir(exist_ok=True)
    (d / f"{task['task_id']}@{uuid.uuid4().hex}").write_text(str(os.getpid()))
    return result


def make_sleep_grid(root, durations, name: str = "lottery-test", extra=None):
    """A planned grid of sleep points under root/dense-test/ (for tests and the benchmark).

    Task i sleeps durations[i]; tasks are listed longest first, as `lottery.grid.plan` plans them.
    `extra` maps task index -> extra fields (e.g. {3: {"kill_once": True}}).
    """
    from common.paths import GridPaths
    from lottery.grid.plan import write_plan

    grid = GridPaths(Path(root) / "dense-test" / name)
    grid.root.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i, d in enumerate(durations):
        task = {"task_id": f"p{i:03d}", "kind": "oneshot", "mask_id": None, "rewind": "init",
                "control": "none", "sparsity": round(0.1 + 0.8 * i / max(1, len(durations) - 1), 4),
                "epochs": 3, "imp_rounds": 0, "imp_rate": 0.0, "seed": i, "cost": float(d),
                "duration": float(d)}
        task.update((extra or {}).get(i, {}))
        tasks.append(task)
    tasks.sort(key=lambda t: (-t["cost"], t["task_id"]))
    write_plan(grid, {"workload": "sleep"}, tasks)
    return grid
