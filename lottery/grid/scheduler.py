"""Running the points of a grid: under MPI (lottery.grid.coordinator) or by claim files.

Modes (`run_grid` picks one):
- mpi:    `mpiexec -n N python -m mpi4py -m lottery run --grid DIR`. Rank 0 hands points out
          longest first to whichever rank asks and runs points itself too (lottery.grid.coordinator).
- claims: one process, or one SLURM job-array element (`--array-index/--array-count`), or several
          launches at once: each walks the task list and runs what it can claim.
Either way a point with a result file is never run again, and results are written atomically.

Preemption (SLURM's pre-timeout signal, forwarded as SIGTERM or SIGUSR1 by the sbatch scripts):
the run's StopToken is requested, the process stops handing out and starting points, the running
points stop after their current batch with their last complete epoch saved under
partial/<task_id>/ (lottery.points.epoch_checkpoint), their claims are released, and `lottery run`
exits with EXIT_PREEMPTED (75). Under MPI one signal is enough: a rank that sees it tells rank 0,
which tells every busy rank. The next launch resumes those points from their saved epoch; a
point's partial state is deleted once its result exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from tqdm import tqdm

from common.atomic import write_json
from common.cluster import pin_local_gpu, process_place
from common.paths import GridPaths
from common.stop import Preempted, StopToken
from lottery.grid.claims import DEFAULT_HEARTBEAT, DEFAULT_STALE_AFTER, ClaimStore, default_owner
from lottery.grid.coordinator import DEFAULT_SILENCE_TIMEOUT, MPI_HEARTBEAT, Coordinator, Worker, run_static
from lottery.grid.plan import done_ids, load_plan, load_tasks, pending_tasks
from lottery.points.task import Task

log = logging.getLogger(__name__)

# execute(task, stop=token) -> the point's result; load_executor binds the rest of the executor's
# arguments: func(run_dir, grid_dir, task, settings, stop).
Execute = Callable[..., Mapping[str, Any]]
DEFAULT_EXECUTOR = "lottery.points.runners:train_point"

EXIT_PREEMPTED = 75  # `lottery run` exit status after a stop request (sysexits' EX_TEMPFAIL)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclasses.dataclass
class RunSummary:
    mode: str
    rank: int
    size: int
    executed: list[str]         # task ids this process ran
    total: int
    done_at_end: int
    preempted: bool = False     # stopped on request; points left are resumable


class WorldSizeError(RuntimeError):
    """The MPI world is not the size the launcher asked for."""


class GridPreempted(SystemExit):
    """The launch was stopped on request (pre-timeout signal) after saving the running points.

    A SystemExit with status EXIT_PREEMPTED, so `lottery run` (and `python -m mpi4py`, which turns
    it into MPI_Abort(75) once every rank is done) ends with that status and no traceback; the
    sbatch scripts requeue on it. In-process callers catch it; `.summary` is the RunSummary.
    """

    def __init__(self, summary: "RunSummary"):
        super().__init__(EXIT_PREEMPTED)
        self.summary = summary


# -- one point -----------------------------------------------------------------------------------
def load_executor(grid: GridPaths, spec: str = DEFAULT_EXECUTOR) -> Execute:
    """`module:function` called as function(run_dir, grid_dir, task, settings, stop) -> dict.

    The default is the real grid point; other specs are workloads such as the scheduler
    benchmark's (lottery.grid.simulate). Imported here, after the GPU was pinned.
    """
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--executor {spec!r}: expected MODULE:FUNCTION")
    func = getattr(importlib.import_module(module_name), func_name, None)
    if not callable(func):
        raise ValueError(f"--executor {spec!r}: {module_name} has no function {func_name}")
    settings = load_plan(grid.root)["settings"]
    run_dir = grid.root.parent

    def execute(task: Task, *, stop: StopToken) -> Mapping[str, Any]:
        # A replicate of a grid over replicate dense runs retrains its own run (a sibling).
        return func(run_dir if task.run is None else run_dir.parent / task.run, grid.root, task,
                    settings, stop)

    return execute


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def run_task(grid: GridPaths, task: Task, *, execute: Execute, worker: Mapping[str, Any],
             stop: StopToken) -> dict:
    """Execute one point and write results/<task_id>.json atomically; returns the record."""
    started = time.time()
    t0 = time.perf_counter()
    result = execute(task, stop=stop)
    wall = time.perf_counter() - t0
    if not isinstance(result, Mapping):
        raise TypeError(f"executor returned {type(result).__name__} for {task.task_id}, "
                        f"expected a dict")
    record = {"task_id": task.task_id, "task": task.to_dict(), "result": _jsonable(result),
              "worker": dict(worker), "started_at": started, "finished_at": time.time(),
              "wall_time": wall}
    write_json(grid.result(task.task_id), record)
    # The result is the point's state from now on; a leftover partial state is garbage.
    shutil.rmtree(grid.partial_state(task.task_id), ignore_errors=True)
    return record


def _worker_info(mode: str, rank: int = 0) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank, "mode": mode}


def _summary(grid: GridPaths, mode: str, rank: int, size: int, executed: list[str],
             preempted: bool) -> RunSummary:
    ids = {t.task_id for t in load_tasks(grid.root)}
    return RunSummary(mode, rank, size, executed, len(ids), len(done_ids(grid) & ids), preempted)


# -- world size ----------------------------------------------------------------------------------
def expected_world_size(env: Mapping[str, str] | None = None) -> int:
    return process_place(dict(os.environ if env is None else env)).size


def check_world_size(actual: int, env: Mapping[str, str] | None = None) -> None:
    """Fail when the launcher started N processes but MPI sees another world size (typically an
    mpiexec of another MPI library: every process is then rank 0 of 1)."""
    expected = expected_world_size(env)
    if expected != actual:
        raise WorldSizeError(
            f"MPI world size is {actual} but the launcher asked for {expected} processes "
            f"(PMI_SIZE / OMPI_COMM_WORLD_SIZE / SLURM_NTASKS): mpi4py is linked against a "
            f"different MPI than the launcher's. Use the mpiexec of the same MPI "
            f"({sys.prefix}/bin/mpiexec), or srun --mpi=pmi2/pmix matching it.")


def _under_mpi_launcher() -> bool:
    return "mpi4py.run" in sys.modules or expected_world_size() > 1


@contextlib.contextmanager
def stop_on_signals(stop: StopToken, signals=STOP_SIGNALS):
    """SIGTERM/SIGUSR1 request `stop` instead of killing the process; the previous handlers come
    back afterwards. Only the main thread may install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        stop.request()  # only sets an Event: safe at any point of the main thread

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- claims mode ---------------------------------------------------------------------------------
def run_with_claims(grid: GridPaths, execute: Execute, stop: StopToken, *, owner: str | None = None,
                    heartbeat: float = DEFAULT_HEARTBEAT, stale_after: float = DEFAULT_STALE_AFTER,
                    mode: str = "claims") -> RunSummary:
    """Run every point this process can claim, longest first, until the grid is complete: points
    held by other live launches are waited for, stale ones reclaimed."""
    tasks = load_tasks(grid.root)
    executed: list[str] = []
    worker = _worker_info(mode)
    preempted = False
    with ClaimStore(grid, owner, heartbeat=heartbeat, stale_after=stale_after) as store, \
            tqdm(total=len(tasks), initial=len(tasks) - len(pending_tasks(grid, tasks)),
                 desc="grid points", unit="pt", disable=None) as bar:
        while not preempted:
            pending = pending_tasks(grid, tasks)
            if not pending:
                break
            ran = False
            for task in pending:
                if stop.requested:
                    preempted = True
                    break
                claim = store.try_claim(task.task_id)
                if claim is None:
                    continue
                try:
                    log.info("running %s", task.task_id)
                    run_task(grid, task, execute=execute, worker=worker, stop=stop)
                except Preempted:
                    log.warning("%s stopped; its last complete epoch is saved for the next launch",
                                task.task_id)
                    preempted = True
                    break
                finally:
                    store.release(claim)  # the next launch (or another element) resumes it
                executed.append(task.task_id)
                ran = True
                bar.update(1)
                break  # re-list: another launch may have finished points meanwhile
            if not ran and not preempted:
                bar.set_postfix_str(f"{len(pending)} held by other launches")
                time.sleep(min(heartbeat, 1.0))  # listing results is cheap; finish promptly
                bar.n = len(tasks) - len(pending_tasks(grid, tasks))
                bar.refresh()
    if preempted:
        log.warning("stop requested (pre-timeout signal): running points save their last complete "
                    "epoch and stop; no new point starts")
    return _summary(grid, mode, 0, 1, executed, preempted)


# -- MPI mode ------------------------------------------------------------------------------------
def run_mpi(grid: GridPaths, execute: Execute, stop: StopToken, comm, *,
            strategy: str = "dynamic", heartbeat: float = MPI_HEARTBEAT,
            silence_timeout: float = DEFAULT_SILENCE_TIMEOUT,
            stale_after: float = DEFAULT_STALE_AFTER, rank0_works: bool = True) -> RunSummary:
    """Run the grid over an MPI communicator of size > 1."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if silence_timeout <= 2 * heartbeat:
        raise ValueError("silence_timeout must exceed twice the heartbeat")
    mode = f"mpi-{strategy}"
    run_point = functools.partial(run_task, grid, execute=execute, stop=stop,
                                  worker=_worker_info("mpi-static" if strategy == "static" else "mpi",
                                                      rank))
    t0 = time.perf_counter()
    preempted = False
    if strategy == "static":
        executed = run_static(comm, grid, run_point)
    elif rank == 0:
        executed, preempted = Coordinator(comm, grid, run_point, stop, heartbeat=heartbeat,
                                          silence_timeout=silence_timeout, stale_after=stale_after,
                                          rank0_works=rank0_works).run()
    else:
        executed, preempted = Worker(comm, run_point, stop, heartbeat=heartbeat,
                                     silence_timeout=silence_timeout).run()
    log.info("rank %d ran %d points in %.1f s%s", rank, len(executed), time.perf_counter() - t0,
             " (stopped on request)" if preempted else "")
    return _summary(grid, mode, rank, size, executed, preempted)


# -- entry point ---------------------------------------------------------------------------------
def _mpi_world():
    """COMM_WORLD when launched by an MPI launcher with more than one process, else None."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    check_world_size(comm.Get_size())
    return comm if comm.Get_size() > 1 else None


def run_grid(grid_dir: str | os.PathLike, *, execute: Execute | None = None,
             executor: str = DEFAULT_EXECUTOR, array_index: int | None = None,
             array_count: int | None = None, strategy: str = "dynamic",
             heartbeat: float | None = None, stale_after: float = DEFAULT_STALE_AFTER,
             silence_timeout: float = DEFAULT_SILENCE_TIMEOUT, rank0_works: bool = True) -> RunSummary:
    """Run the pending points of a planned grid in the mode the environment calls for.

    `execute(task, stop=token)` replaces the `executor` spec (in-process callers). SIGTERM/SIGUSR1
    during the run stop it cleanly (module docstring): GridPreempted on rank 0.
    """
    grid = GridPaths(Path(grid_dir))
    load_plan(grid.root)  # fail early, naming the file, on a grid that is not planned
    if (array_index is None) != (array_count is None):
        raise ValueError("--array-index and --array-count go together")
    if array_count is not None and not (array_count >= 1 and 0 <= array_index < array_count):
        raise ValueError(f"--array-index {array_index} must lie in 0..{array_count - 1} "
                         f"(--array-count {array_count})")
    comm = _mpi_world() if array_index is None and _under_mpi_launcher() else None
    place = process_place()
    if "tensorflow" in sys.modules:
        log.warning("TensorFlow was imported before the GPU was pinned: all ranks may share GPU 0")
    device = pin_local_gpu(place)
    log.info("rank %d/%d, local rank %d: %s", place.rank, place.size, place.local_rank,
             f"GPU {device}" if device is not None else "CPU (no GPU visible)")
    execute = execute or load_executor(grid, executor)
    stop = StopToken()
    with stop_on_signals(stop):
        if comm is not None:
            summary = run_mpi(grid, execute, stop, comm, strategy=strategy,
                              heartbeat=heartbeat if heartbeat is not None else MPI_HEARTBEAT,
                              silence_timeout=silence_timeout, stale_after=stale_after,
                              rank0_works=rank0_works)
        else:
            tag = f"array{array_index}of{array_count}" if array_index is not None else "single"
            summary = run_with_claims(
                grid, execute, stop, owner=default_owner(tag),
                heartbeat=heartbeat if heartbeat is not None else DEFAULT_HEARTBEAT,
                stale_after=stale_after, mode="array" if array_index is not None else "single")
    # Only rank 0 ends with the status: it returns after every worker was released, whereas a
    # worker's non-zero exit would abort rank 0 while it may still be saving its own point.
    if summary.preempted and summary.rank == 0:
        log.warning("stopped on request: %d/%d points done, this launch ran %d; the next launch "
                    "resumes the rest (exit status %d)", summary.done_at_end, summary.total,
                    len(summary.executed), EXIT_PREEMPTED)
        raise GridPreempted(summary)
    return summary
