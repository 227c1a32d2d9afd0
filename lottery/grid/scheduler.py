"""Running the points of a grid: under MPI (dynamic hand-out by rank 0) or by claim files.

Modes (`run_grid` picks one):
- mpi:    `mpiexec -n N python -m mpi4py -m lottery run --grid DIR`. Rank 0 claims points (claim
          files, so other launches on the same grid stay safe) and hands them out longest first to
          whichever rank asks; rank 0 works too, in a thread, while its main thread coordinates.
          Only main threads call MPI. Busy ranks send a heartbeat; rank 0 fails the job if one goes
          silent, and a worker fails if rank 0 stops answering, so a dead rank never leaves the rest
          hanging (`python -m mpi4py` turns the exception into MPI_Abort).
- claims: one process, or one SLURM job-array element (`--array-index/--array-count`), or several
          launches at once: each walks the task list and runs what it can claim.
Either way a point with a result file is never run again, and results are written atomically.

Preemption (SLURM's pre-timeout signal, forwarded as SIGTERM or SIGUSR1 by the sbatch scripts):
the process stops handing out and starting points, the running points stop after their current
batch with their last complete epoch saved under partial/<task_id>/ (lottery.points.masked_training),
their claims are released, and `lottery run` exits with EXIT_PREEMPTED (75). Under MPI one signal
is enough: a rank that sees it tells rank 0, which tells every busy rank. The next launch resumes
those points from their saved epoch; a point's partial state is deleted once its result exists.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
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
from lottery.grid.claims import DEFAULT_HEARTBEAT, DEFAULT_STALE_AFTER, ClaimStore
from lottery.grid.plan import done_ids, load_plan, pending_tasks
from lottery.points.masked_training import Preempted, clear_stop, request_stop, stop_requested

log = logging.getLogger(__name__)

Execute = Callable[[dict], dict]
DEFAULT_EXECUTOR = "lottery.points.oneshot:train_point"

TAG_REQUEST = 11   # worker -> rank 0: {"type": "ready" | "done" | "preempted" | "alive", ...}
TAG_ASSIGN = 12    # rank 0 -> worker: a task dict, or None to stop
TAG_STOP = 13      # rank 0 -> busy worker: stop the running point (preemption)
EXIT_PREEMPTED = 75  # `lottery run` exit status after a stop request (sysexits' EX_TEMPFAIL)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
POLL = 0.002       # seconds between MPI polls when busy: far under the 0.2 s per-point budget
MAX_POLL = 0.01    # ... and when idle (answers within 10 ms, ~100 GIL wake-ups/s)
STARTUP_TIMEOUT = 120.0  # a worker's first wait for rank 0


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


# -- executors ---------------------------------------------------------------------------------
def load_executor(grid: GridPaths, spec: str = DEFAULT_EXECUTOR) -> Execute:
    """`module:function` called as function(run_dir, grid_dir, task, settings) -> dict.

    The default is the real grid point (`lottery.points.oneshot.train_point`); other specs are workloads
    such as the scheduler benchmark's. Imported here, after the GPU was pinned.
    """
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--executor {spec!r}: expected MODULE:FUNCTION")
    func = getattr(importlib.import_module(module_name), func_name, None)
    if not callable(func):
        raise ValueError(f"--executor {spec!r}: {module_name} has no function {func_name}")
    settings = load_plan(grid.root)["settings"]
    run_dir = grid.root.parent

    def execute(task: dict) -> dict:
        return func(run_dir, grid.root, task, settings)

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


def run_task(grid: GridPaths, task: dict, execute: Execute, worker: Mapping[str, Any]) -> dict:
    """Execute one point and write results/<task_id>.json atomically; returns the record."""
    started = time.time()
    t0 = time.perf_counter()
    result = execute(task)
    wall = time.perf_counter() - t0
    if not isinstance(result, Mapping):
        raise TypeError(f"executor returned {type(result).__name__} for {task['task_id']}, "
                        f"expected a dict")
    record = {"task_id": task["task_id"], "task": task, "result": _jsonable(result),
              "worker": dict(worker), "started_at": started, "finished_at": time.time(),
              "wall_time": wall}
    write_json(grid.result(task["task_id"]), record)
    # The result is the point's state from now on; a leftover partial state is garbage.
    shutil.rmtree(grid.partial_state(task["task_id"]), ignore_errors=True)
    return record


def _worker_info(mode: str, rank: int = 0) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank, "mode": mode}


# -- world size --------------------------------------------------------------------------------
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
def stop_on_signals(signals=STOP_SIGNALS):
    """SIGTERM/SIGUSR1 ask this process to stop cleanly (request_stop) instead of dying; the
    previous handlers come back afterwards. Only the main thread may install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        request_stop()  # only sets an Event: safe at any point of the main thread

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _log_stop() -> None:
    log.warning("stop requested (pre-timeout signal): running points save their last complete "
                "epoch and stop; no new point starts")


# -- claims mode -------------------------------------------------------------------------------
def run_with_claims(grid: GridPaths, execute: Execute, *, owner: str | None = None,
                    heartbeat: float = DEFAULT_HEARTBEAT, stale_after: float = DEFAULT_STALE_AFTER,
                    wait: bool = True, mode: str = "claims") -> RunSummary:
    """Run every point this process can claim, longest first. With `wait`, keep going until the
    grid is complete: points held by other live launches are waited for, stale ones reclaimed."""
    tasks = load_plan(grid.root)["tasks"]
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
                if stop_requested():
                    preempted = True
                    break
                claim = store.try_claim(task["task_id"])
                if claim is None:
                    continue
                try:
                    log.info("running %s", task["task_id"])
                    run_task(grid, task, execute, worker)
                except Preempted:
                    log.warning("%s stopped; its last complete epoch is saved for the next launch",
                                task["task_id"])
                    preempted = True
                    break
                finally:
                    store.release(claim)  # the next launch (or another element) resumes it
                executed.append(task["task_id"])
                ran = True
                bar.update(1)
                break  # re-list: another launch may have finished points meanwhile
            if not ran and not preempted:
                if not wait:
                    break
                bar.set_postfix_str(f"{len(pending)} held by other launches")
                time.sleep(min(heartbeat, 1.0))  # listing results is cheap; finish promptly
                bar.n = len(tasks) - len(pending_tasks(grid, tasks))
                bar.refresh()
    if preempted:
        _log_stop()
    return RunSummary(mode, 0, 1, executed, len(tasks),
                      len(done_ids(grid) & {t["task_id"] for t in tasks}), preempted)


# -- MPI mode ----------------------------------------------------------------------------------
class _TaskThread:
    """Runs one task at a time off the main thread, so the main thread stays free for MPI."""

    def __init__(self, grid: GridPaths, execute: Execute, worker: dict):
        self.grid, self.execute, self.worker = grid, execute, worker
        self.thread: threading.Thread | None = None
        self.task: dict | None = None
        self.error: BaseException | None = None
        self.preempted = False  # the task last finished stopped on request (no result)

    def start(self, task: dict) -> None:
        self.task, self.error, self.preempted = task, None, False
        self.thread = threading.Thread(target=self._run, name=f"point-{task['task_id']}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            run_task(self.grid, self.task, self.execute, self.worker)
        except BaseException as err:  # re-raised in the main thread, which aborts the job
            self.error = err

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def finished(self) -> dict | None:
        """The task just finished (once), raising its error if it failed."""
        if self.thread is None or self.thread.is_alive():
            return None
        self.thread.join()
        self.thread = None
        if isinstance(self.error, Preempted):
            self.preempted = True
            return self.task
        if self.error is not None:
            raise RuntimeError(f"grid point {self.task['task_id']} failed: {self.error!r}") from self.error
        return self.task


def _coordinate(comm, grid: GridPaths, execute: Execute, *, heartbeat: float, stale_after: float,
                silence_timeout: float, rank0_works: bool) -> tuple[list[str], bool]:
    """Rank 0's loop; returns (task ids it ran itself, whether the job was stopped on request)."""
    tasks = load_plan(grid.root)["tasks"]
    queue = collections.deque(pending_tasks(grid, tasks))
    size = comm.Get_size()
    store = ClaimStore(grid, f"{socket.gethostname()}:{os.getpid()}:mpi-rank0",
                       heartbeat=heartbeat, stale_after=stale_after)
    busy: dict[int, tuple[dict, Any, float]] = {}   # rank -> (task, claim, last heard)
    stopped: set[int] = set()
    told_to_stop: set[int] = set()
    stopping = False
    executed: list[str] = []
    own = _TaskThread(grid, execute, _worker_info("mpi", 0))
    own_claim = None
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(queue), desc="grid points", unit="pt",
               disable=None)

    def next_task():
        while queue and not stopping:
            task = queue.popleft()
            claim = store.try_claim(task["task_id"])
            if claim is not None:
                return task, claim
        return None

    request = comm.irecv(source=MPI_ANY_SOURCE(), tag=TAG_REQUEST)
    status = _status()
    last_rescan = 0.0
    nap = POLL
    try:
        while True:
            progressed = False
            if not stopping and stop_requested():
                stopping = True
                _log_stop()
            ok, msg = request.test(status)
            while ok:
                progressed = True
                src = status.Get_source()
                if msg["type"] == "alive":
                    if src in busy:
                        task, claim, _ = busy[src]
                        busy[src] = (task, claim, time.monotonic())
                else:
                    if msg["type"] in ("done", "preempted") and src in busy:
                        task, claim, _ = busy.pop(src)
                        store.release(claim)
                        if msg["type"] == "done":
                            bar.update(1)
                    if msg["type"] == "preempted" and not stopping:
                        # That rank got the signal: the whole job is being stopped.
                        request_stop()
                        stopping = True
                        _log_stop()
                    nxt = next_task()
                    if nxt is None:
                        comm.send(None, dest=src, tag=TAG_ASSIGN)
                        stopped.add(src)
                    else:
                        busy[src] = (nxt[0], nxt[1], time.monotonic())
                        comm.send(nxt[0], dest=src, tag=TAG_ASSIGN)
                request = comm.irecv(source=MPI_ANY_SOURCE(), tag=TAG_REQUEST)
                ok, msg = request.test(status)
            if stopping:
                for rank in busy:
                    if rank not in told_to_stop:  # once: it answers "preempted" or "done"
                        comm.send({"type": "stop"}, dest=rank, tag=TAG_STOP)
                        told_to_stop.add(rank)
            finished = own.finished()
            if finished is not None:
                store.release(own_claim)
                if not own.preempted:
                    executed.append(finished["task_id"])
                    bar.update(1)
                progressed = True
            if rank0_works and not own.busy:
                nxt = next_task()
                if nxt is not None:
                    own.start(nxt[0])
                    own_claim = nxt[1]
                    progressed = True
            now = time.monotonic()
            for rank, (task, _claim, heard) in busy.items():
                if now - heard > silence_timeout:
                    raise RuntimeError(f"rank {rank} silent for {now - heard:.0f} s while running "
                                       f"{task['task_id']}: assuming it died; aborting the job")
            if len(stopped) == size - 1 and not own.busy and (stopping or not queue):
                if not rank0_works or stopping:
                    break
                # Points claimed by other launches: wait for them, and run those whose claim
                # goes stale (a dead launch) here, so the grid ends complete.
                held_elsewhere = pending_tasks(grid, tasks)
                if not held_elsewhere:
                    break
                if time.monotonic() - last_rescan >= heartbeat:
                    last_rescan = time.monotonic()
                    queue.extend(held_elsewhere)
                    progressed = True
            # Back off while nothing happens: a tight poll would keep taking the GIL from the
            # point training in this process's own thread.
            nap = POLL if progressed else min(nap * 1.5, MAX_POLL)
            if not progressed:
                time.sleep(nap)
    finally:
        bar.close()
        # Every worker was told to stop, so the last posted receive can never match.
        request.Cancel()
        MPI_Request_Wait(request)
        store.close()
    return executed, stopping


def _work(comm, grid: GridPaths, execute: Execute, *, heartbeat: float,
          silence_timeout: float) -> tuple[list[str], bool]:
    rank = comm.Get_rank()
    runner = _TaskThread(grid, execute, _worker_info("mpi", rank))
    executed: list[str] = []
    preempted = False
    stop_request = comm.irecv(source=0, tag=TAG_STOP)
    stop_received = False
    comm.send({"type": "ready"}, dest=0, tag=TAG_REQUEST)
    # Rank 0 may still be starting up (imports, a slow file system) when we first ask.
    wait = max(silence_timeout, STARTUP_TIMEOUT)
    try:
        while True:
            request = comm.irecv(source=0, tag=TAG_ASSIGN)
            deadline = time.monotonic() + wait
            while True:
                ok, task = request.test()
                if ok:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank 0 did not answer for {wait:.0f} s: assuming "
                                       f"it died; aborting the job")
                time.sleep(POLL)
            wait = silence_timeout
            if task is None:
                return executed, preempted
            if stop_requested():  # signalled between points: give the task back unrun
                preempted = True
                comm.send({"type": "preempted", "task_id": task["task_id"]}, dest=0, tag=TAG_REQUEST)
                continue
            runner.start(task)
            last_beat = time.monotonic()
            while runner.busy:
                runner.thread.join(POLL * 10)
                if not stop_received:
                    stop_received, _ = stop_request.test()
                    if stop_received:
                        request_stop()  # rank 0 says the job is stopping
                if time.monotonic() - last_beat >= heartbeat:
                    comm.send({"type": "alive"}, dest=0, tag=TAG_REQUEST)
                    last_beat = time.monotonic()
            runner.finished()
            if runner.preempted:
                preempted = True
                comm.send({"type": "preempted", "task_id": task["task_id"]}, dest=0, tag=TAG_REQUEST)
            else:
                executed.append(task["task_id"])
                comm.send({"type": "done", "task_id": task["task_id"]}, dest=0, tag=TAG_REQUEST)
    finally:
        if not stop_received:  # rank 0 sends at most one stop, only to a busy rank
            stop_request.Cancel()
            MPI_Request_Wait(stop_request)


def _static(comm, grid: GridPaths, execute: Execute) -> list[str]:
    """Static striding: rank r runs pending tasks r, r+N, ... (only to compare in benchmarks)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = pending_tasks(grid)[rank::size]
    executed = []
    for task in mine:
        run_task(grid, task, execute, _worker_info("mpi-static", rank))
        executed.append(task["task_id"])
    barrier = comm.Ibarrier()  # polled, not blocking: a rank waits for the slowest one
    while not barrier.Test():
        time.sleep(POLL)
    return executed


def MPI_ANY_SOURCE() -> int:
    from mpi4py import MPI

    return MPI.ANY_SOURCE


def MPI_Request_Wait(request) -> None:
    """Complete a (cancelled) request without unpickling a message."""
    from mpi4py import MPI

    MPI.Request.Wait(request)


def _status():
    from mpi4py import MPI

    return MPI.Status()


def run_mpi(grid: GridPaths, execute: Execute, comm=None, *, strategy: str = "dynamic",
            heartbeat: float = 5.0, silence_timeout: float = 30.0,
            stale_after: float = DEFAULT_STALE_AFTER, rank0_works: bool = True) -> RunSummary:
    """Run the grid over an MPI communicator (default COMM_WORLD) of size > 1."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    if silence_timeout <= 2 * heartbeat:
        raise ValueError("silence_timeout must exceed twice the heartbeat")
    t0 = time.perf_counter()
    preempted = False
    if strategy == "static":
        executed = _static(comm, grid, execute)  # benchmarks only: no preemption protocol
    elif rank == 0:
        executed, preempted = _coordinate(comm, grid, execute, heartbeat=heartbeat,
                                          stale_after=stale_after, silence_timeout=silence_timeout,
                                          rank0_works=rank0_works)
    else:
        executed, preempted = _work(comm, grid, execute, heartbeat=heartbeat,
                                    silence_timeout=silence_timeout)
    log.info("rank %d ran %d points in %.1f s%s", rank, len(executed), time.perf_counter() - t0,
             " (stopped on request)" if preempted else "")
    tasks = load_plan(grid.root)["tasks"]
    return RunSummary(f"mpi-{strategy}", rank, size, executed, len(tasks),
                      len(done_ids(grid) & {t["task_id"] for t in tasks}), preempted)


# -- entry point -------------------------------------------------------------------------------
def run_grid(grid_dir: str | os.PathLike, *, execute: Execute | None = None,
             executor: str = DEFAULT_EXECUTOR, array_index: int | None = None,
             array_count: int | None = None, strategy: str = "dynamic",
             heartbeat: float | None = None, stale_after: float = DEFAULT_STALE_AFTER,
             silence_timeout: float = 30.0, rank0_works: bool = True) -> RunSummary:
    """Run the pending points of a planned grid in the mode the environment calls for.

    SIGTERM/SIGUSR1 during the run stop it cleanly (module docstring); the summary then says
    `preempted`.
    """
    grid = GridPaths(Path(grid_dir))
    load_plan(grid.root)  # fail early, naming the file, on a grid that is not planned
    if (array_index is None) != (array_count is None):
        raise ValueError("--array-index and --array-count go together")
    if array_count is not None and not (array_count >= 1 and 0 <= array_index < array_count):
        raise ValueError(f"--array-index {array_index} must lie in 0..{array_count - 1} "
                         f"(--array-count {array_count})")
    comm = None
    if array_index is None and _under_mpi_launcher():
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        check_world_size(comm.Get_size())
        if comm.Get_size() == 1:
            comm = None
    place = process_place()
    if "tensorflow" in sys.modules:
        log.warning("TensorFlow was imported before the GPU was pinned: all ranks may share GPU 0")
    device = pin_local_gpu(place)
    log.info("rank %d/%d, local rank %d: GPU %s", place.rank, place.size, place.local_rank,
             device if device is not None else "none (CPU)")
    execute = execute or load_executor(grid, executor)
    clear_stop()
    with stop_on_signals():
        if comm is not None:
            summary = run_mpi(grid, execute, comm, strategy=strategy,
                              heartbeat=heartbeat if heartbeat is not None else 5.0,
                              silence_timeout=silence_timeout, stale_after=stale_after,
                              rank0_works=rank0_works)
        else:
            tag = f"array{array_index}of{array_count}" if array_index is not None else "single"
            summary = run_with_claims(
                grid, execute, owner=f"{socket.gethostname()}:{os.getpid()}:{tag}",
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
