"""A real but cheap grid-point executor, for scheduler benchmarks and fault tests.

`sleep_point` sleeps for the task's params["duration"] (so a run measures scheduling, not
training) and returns a result computed from the task (so a wrong task/result pairing is visible).
Each execution leaves two records beside the grid, with the worker's own timestamps: one under
starts/ when it begins, one under executions/ when it COMPLETES (so a point run twice is counted
twice, and a point killed mid-way has a start and no completion). `audit` reads them back and
checks that every point was done exactly once. Optional params drive fault tests: `kill_once`
SIGKILLs the process, `stop_once` SIGSTOPs it, `fail` raises; the *_once faults fire only on the
first attempt (a marker file beside the grid). It does not watch the stop token: a point, once
started, finishes.

    lottery run --grid DIR --executor lottery.grid.simulate:sleep_point
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import signal
import socket
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from common.atomic import read_json
from common.cluster import process_place
from common.paths import GridPaths
from common.stop import StopToken
from lottery.grid.plan import load_tasks, write_plan
from lottery.points.task import Task

EXECUTOR = "lottery.grid.simulate:sleep_point"


def executions_dir(grid_dir) -> Path:
    return Path(grid_dir).parent / "executions"


def starts_dir(grid_dir) -> Path:
    return Path(grid_dir).parent / "starts"


def completed_executions(grid_dir) -> dict[str, int]:
    """task id -> how many times sleep_point ran it to the end."""
    counts: dict[str, int] = {}
    d = executions_dir(grid_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith("."):
                continue
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


def _write_record(path: Path, record: Mapping[str, Any]) -> None:
    """Hidden temporary name, then rename: a reader never sees half a record. No fsync: a record
    must survive its process being killed (the page cache does), not the machine crashing, and a
    simulated point should not wait for the disk."""
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def sleep_point(run_dir, grid_dir, task: Task, settings: Mapping[str, Any],
                stop: StopToken) -> dict[str, Any]:
    """The executor: func(run_dir, grid_dir, task, settings, stop) -> result."""
    called_at = time.time()
    params = task.params or {}
    execution = uuid.uuid4().hex
    record = {"task_id": task.task_id, "execution": execution, "pid": os.getpid(),
              "rank": process_place().rank, "host": socket.gethostname(), "called_at": called_at}
    _write_record(starts_dir(grid_dir) / f"{task.task_id}@{execution}", record)
    if params.get("fail"):
        raise RuntimeError(f"workload asked to fail on {task.task_id}")
    if params.get("kill_once") and _first_time(grid_dir, task, "killed"):
        os.kill(os.getpid(), signal.SIGKILL)
    if params.get("stop_once") and _first_time(grid_dir, task, "stopped"):
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.perf_counter()
    # Sleep to a deadline from the call, so the record-keeping above does not lengthen the point.
    time.sleep(max(0.0, float(params.get("duration", 0.0)) - (time.time() - called_at)))
    acc = expected_accuracy(task)
    epochs = task.epochs or 3
    # The result format of the real grid point: history as one row per epoch.
    history = [{"epoch": e + 1, "loss": round(1.0 / (e + 1), 6),
                "val_accuracy": round(acc * (1 - math.exp(-(e + 1))), 6)} for e in range(epochs)]
    result = {"accuracy": acc, "loss": round(1 - acc, 6), "sparsity": task.sparsity,
              "epochs_to_best": epochs, "time": time.perf_counter() - t0, "history": history,
              "pid": os.getpid(), "execution": execution}
    if task.kind == "imp":
        fields = task.to_dict()
        rounds = []
        for r in range(1, task.imp_rounds + 1):
            s = 1 - (1 - task.imp_rate) ** r
            rounds.append({"round": r, "sparsity": s,
                           "accuracy": expected_accuracy({**fields, "sparsity": s})})
        result["rounds"] = rounds
    _write_record(executions_dir(grid_dir) / f"{task.task_id}@{execution}",
                  {**record, "returned_at": time.time()})
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
    width = max(3, len(str(len(durations) - 1)))
    tasks = []
    for i, duration in enumerate(durations):
        tasks.append(Task(task_id=f"p{i:0{width}d}", kind="oneshot", rewind="init", control="none",
                          sparsity=round(0.1 + 0.8 * i / max(1, len(durations) - 1), 4),
                          epochs=3, seed=i, cost=float(costs[i]),
                          params={"duration": float(duration), **(params or {}).get(i, {})}))
    tasks.sort(key=lambda t: (-t.cost, t.task_id))
    write_plan(grid, {"workload": "sleep"}, tasks)
    return grid


# -- workload and its ideal schedule -----------------------------------------------------------
def fit_lognormal(seconds: Iterable[float], tail: float = 0.95) -> tuple[float, float]:
    """(median, sigma) of the lognormal through the sample's median and its `tail` quantile.

    Real grids mix kinds (an IMP chain costs several one-shot points), so their times are lumpy
    and a fit by the moments of the logs puts too little weight in the tail; matching a high
    quantile keeps the share of long points, which is what makes scheduling hard.
    """
    values = np.asarray([s for s in seconds if s > 0], dtype=float)
    if values.size < 2:
        raise ValueError("fitting a lognormal needs at least two positive point times")
    median, high = np.quantile(values, [0.5, tail])
    return float(median), float(np.log(high / median) / statistics.NormalDist().inv_cdf(tail))


def lognormal_durations(n: int, median: float, sigma: float, seed: int = 0) -> list[float]:
    """n heavy-tailed point durations (seconds, 3 decimals), reproducible from the seed."""
    rng = np.random.default_rng(seed)
    return [round(float(d), 3) for d in rng.lognormal(math.log(median), sigma, n)]


def lpt_makespan(durations: Sequence[float], workers: int,
                 ready_at: Sequence[float] | None = None) -> float:
    """Makespan of the longest-processing-time-first schedule: each point, longest first, goes to
    the worker free earliest. `ready_at[i]` is when worker i can start (all at 0 by default)."""
    ready = sorted(ready_at) if ready_at is not None else [0.0] * workers
    if len(ready) != workers:
        raise ValueError(f"ready_at has {len(ready)} entries for {workers} workers")
    heapq.heapify(ready)
    for d in sorted(durations, reverse=True):
        heapq.heappush(ready, heapq.heappop(ready) + d)
    return max(ready)


# -- what ran: the records, and the exactly-once audit -----------------------------------------
@dataclasses.dataclass(frozen=True)
class Execution:
    """One call of sleep_point, by its worker's own clock (time.time())."""
    task_id: str
    execution: str
    pid: int
    rank: int
    called_at: float
    returned_at: float | None   # None: it never completed (killed mid-point)


def read_executions(grid_dir) -> list[Execution]:
    """Every execution started on this grid, in order of start."""
    completed = {}
    if executions_dir(grid_dir).is_dir():
        for p in executions_dir(grid_dir).iterdir():
            if not p.name.startswith("."):
                completed[p.name] = json.loads(p.read_text())["returned_at"]
    out = []
    if starts_dir(grid_dir).is_dir():
        for p in starts_dir(grid_dir).iterdir():
            if not p.name.startswith("."):
                r = json.loads(p.read_text())
                out.append(Execution(r["task_id"], r["execution"], r["pid"], r["rank"],
                                     r["called_at"], completed.get(p.name)))
    return sorted(out, key=lambda e: e.called_at)


def running_points(grid_dir) -> list[Execution]:
    """Executions started and not completed (running now, or killed)."""
    return [e for e in read_executions(grid_dir) if e.returned_at is None]


@dataclasses.dataclass
class Audit:
    """Whether every point of a grid was done exactly once (`ok`), and what the faults cost.

    A point is done when its result file exists. Faults interrupt executions: killed mid-point
    (a start without a completion), or killed after completing but before its result was written
    (a completion the result file does not name): both are work lost to the fault and redone, not
    duplicates. A duplicate is a point whose completed work was committed twice (a process ran
    on, or ended normally, after completing it, and it is not the execution the result names) or
    that started again after an execution had completed it; a concurrent pair is two executions
    of one point alive at the same time.
    """
    points: int
    lost: list[str]
    duplicated: list[str]
    concurrent: list[str]
    interrupted: dict[str, int]      # task id -> executions it lost to faults
    uncommitted: list[str]           # completed, then killed before the result was written
    executions: int

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.concurrent)

    def summary(self) -> dict[str, Any]:
        return {"points": self.points, "lost": len(self.lost), "duplicated": len(self.duplicated),
                "concurrent": len(self.concurrent), "interrupted": sum(self.interrupted.values()),
                "uncommitted": len(self.uncommitted), "executions": self.executions}


def audit(grid: GridPaths, died_at: Mapping[int, float],
          done_snapshots: Sequence[tuple[float, Collection[str]]] = ()) -> Audit:
    """Check the records against the result files.

    `died_at` maps the pid of every process that was killed (by a fault, or by the teardown of
    its job) to a time by which it was dead; every other process ended normally.
    `done_snapshots` are (time, the ids with a result at that time), taken after faults: a point
    done at such a time must never start again.
    """
    by_task: dict[str, list[Execution]] = {}
    for e in read_executions(grid.root):
        by_task.setdefault(e.task_id, []).append(e)
    last_start: dict[int, float] = {}
    for runs in by_task.values():
        for e in runs:
            last_start[e.pid] = max(last_start.get(e.pid, 0.0), e.called_at)
    ids = [t.task_id for t in load_tasks(grid.root)]
    lost, duplicated, concurrent, uncommitted, interrupted = [], [], [], [], {}
    for task_id in ids:
        runs = by_task.get(task_id, [])
        path = grid.result(task_id)
        named = read_json(path)["result"].get("execution") if path.exists() else None
        if named is None:
            lost.append(task_id)
        committed = []
        for e in runs:
            # Lost to a fault: killed mid-point, or killed after completing and before the result
            # was written (its process died and never started another point).
            if e.returned_at is None or (e.execution != named and e.pid in died_at
                                         and last_start[e.pid] == e.called_at):
                interrupted[task_id] = interrupted.get(task_id, 0) + 1
                if e.returned_at is not None:
                    uncommitted.append(task_id)
            else:
                committed.append(e)
        done_since = [c.returned_at for c in committed]
        done_since += [t for t, done in done_snapshots if task_id in done]
        if len(committed) > 1 or any(e.called_at > t for t in done_since for e in runs):
            duplicated.append(task_id)
        for a, b in zip(runs, runs[1:]):
            a_gone = a.returned_at if a.returned_at is not None else died_at.get(a.pid, math.inf)
            if a_gone > b.called_at:
                concurrent.append(task_id)
                break
    return Audit(len(ids), lost, duplicated, concurrent, interrupted, uncommitted,
                 sum(len(r) for r in by_task.values()))
