"""MPI mode of the grid scheduler: rank 0 coordinates, every other rank works.

Rank 0 claims points (claim files, so other launches on the same grid stay safe) and hands them
out longest first to whichever rank asks; it also runs points itself in a thread while its main
thread coordinates. Only main threads call MPI.

The protocol (TAG_* below): a worker sends "ready" (with its host and pid, which rank 0 writes
into the claims it takes for it, for `lottery status`), then "done" or "preempted" after each point it
was given, and "alive" every `heartbeat` seconds while busy; rank 0 answers every "ready", "done"
and "preempted" with the next task, or None to release the worker. When the job is stopping (a
pre-timeout signal on any rank), rank 0 hands out nothing more and sends one TAG_STOP to every busy
rank, whose point then stops after its current batch.

Liveness: rank 0 aborts the job when a busy rank is silent longer than `silence_timeout`, and a
worker aborts when rank 0 does not answer, so a dead rank never leaves the others hanging
(`python -m mpi4py` turns the exception into MPI_Abort).

mpi4py is imported inside functions: `lottery run` pins the GPU before anything imports it.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Callable

from tqdm import tqdm

from common.paths import GridPaths
from common.stop import Preempted, StopToken
from lottery.grid.claims import DEFAULT_STALE_AFTER, Claim, ClaimStore, default_owner, this_worker
from lottery.grid.plan import load_tasks, pending_tasks
from lottery.points.task import Task

log = logging.getLogger(__name__)

RunPoint = Callable[[Task], Any]   # runs one point to its result file (the scheduler's run_task)

TAG_REQUEST = 11   # worker -> rank 0: {"type": "ready" | "done" | "preempted" | "alive", ...}
TAG_ASSIGN = 12    # rank 0 -> worker: a Task (pickled: same job, trusted), or None to release it
TAG_STOP = 13      # rank 0 -> busy worker: stop the running point (preemption)

MPI_HEARTBEAT = 5.0             # seconds between a busy worker's "alive" messages (and claim touches)
DEFAULT_SILENCE_TIMEOUT = 30.0  # a busy rank (or rank 0) silent this long is taken for dead
STARTUP_TIMEOUT = 120.0         # a worker's first wait for rank 0 (imports, a slow file system)
POLL = 0.002       # seconds between MPI polls when busy: far under the 0.2 s per-point budget
MAX_POLL = 0.01    # ... and when idle (answers within 10 ms, ~100 GIL wake-ups/s)
# A busy worker wakes only to relay a stop and send heartbeats (the end of its point wakes it
# at once); waking every 20 ms instead doubled a simulated 80-rank worker's CPU time.
BUSY_POLL = 0.25


class PointThread:
    """Runs one point at a time off the main thread, so the main thread stays free for MPI."""

    def __init__(self, run_point: RunPoint):
        self.run_point = run_point
        self.thread: threading.Thread | None = None
        self.task: Task | None = None
        self.error: BaseException | None = None
        self.preempted = False  # the point last finished stopped on request (no result)

    def start(self, task: Task) -> None:
        self.task, self.error, self.preempted = task, None, False
        self.thread = threading.Thread(target=self._run, name=f"point-{task.task_id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.run_point(self.task)
        except BaseException as err:  # re-raised in the main thread, which aborts the job
            self.error = err

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def finished(self) -> Task | None:
        """The point just finished (once), raising its error if it failed."""
        if self.thread is None or self.thread.is_alive():
            return None
        self.thread.join()
        self.thread = None
        if isinstance(self.error, Preempted):
            self.preempted = True
        elif self.error is not None:
            raise RuntimeError(f"grid point {self.task.task_id} failed: {self.error!r}") from self.error
        return self.task


@dataclasses.dataclass
class Assignment:
    """A point handed to a worker rank."""
    task: Task
    claim: Claim
    heard_at: float   # time.monotonic() of the rank's last message


class Coordinator:
    """Rank 0: hands out points, relays a stop to busy ranks, watches their heartbeats."""

    def __init__(self, comm, grid: GridPaths, run_point: RunPoint, stop: StopToken, *,
                 heartbeat: float = MPI_HEARTBEAT, silence_timeout: float = DEFAULT_SILENCE_TIMEOUT,
                 stale_after: float = DEFAULT_STALE_AFTER, rank0_works: bool = True):
        self.comm, self.grid, self.stop = comm, grid, stop
        self.heartbeat, self.silence_timeout, self.rank0_works = heartbeat, silence_timeout, rank0_works
        self.workers = comm.Get_size() - 1
        self.tasks = load_tasks(grid.root)
        self.queue = collections.deque(pending_tasks(grid, self.tasks))   # longest first
        self.store = ClaimStore(grid, default_owner("mpi-rank0"), heartbeat=heartbeat,
                                stale_after=stale_after)
        self.busy: dict[int, Assignment] = {}
        self.where: dict[int, dict] = {}      # rank -> {"host", "pid"}, from its "ready"
        self.released: set[int] = set()       # ranks sent None: they have left the loop
        self.told_to_stop: set[int] = set()
        self.stopping = False
        self.executed: list[str] = []         # points rank 0 ran itself
        self.own = PointThread(run_point)
        self.own_claim: Claim | None = None
        self.last_rescan = 0.0
        self.bar = tqdm(total=len(self.tasks), initial=len(self.tasks) - len(self.queue),
                        desc="grid points", unit="pt", disable=None)
        self.status = _new_status()
        self.request = _receive_request(comm)

    def run(self) -> tuple[list[str], bool]:
        """Coordinate until every worker is released; returns (the task ids rank 0 ran, whether
        the job was stopped on request)."""
        nap = POLL
        try:
            while not self._finished():
                progressed = self._step()
                # Back off while nothing happens: a tight poll would keep taking the GIL from the
                # point training in this process's own thread.
                nap = POLL if progressed else min(nap * 1.5, MAX_POLL)
                if not progressed:
                    time.sleep(nap)
        finally:
            self._close()
        return self.executed, self.stopping

    def _step(self) -> bool:
        """One round of everything rank 0 does; whether anything happened."""
        if self.stop.requested:
            self._begin_stopping()
        progressed = self._handle_messages()
        if self.stopping:
            self._tell_busy_ranks_to_stop()
        progressed |= self._collect_own_point()
        progressed |= self._start_own_point()
        self._check_liveness()
        progressed |= self._rescan_points_held_elsewhere()
        return progressed

    # -- messages ------------------------------------------------------------------------
    def _handle_messages(self) -> bool:
        handled = False
        ok, msg = self.request.test(self.status)
        while ok:
            handled = True
            self._handle(self.status.Get_source(), msg)
            self.request = _receive_request(self.comm)
            ok, msg = self.request.test(self.status)
        return handled

    def _handle(self, rank: int, msg: dict) -> None:
        kind = msg["type"]
        if "host" in msg:
            self.where[rank] = {"host": msg["host"], "pid": msg.get("pid")}
        if kind == "alive":
            if rank in self.busy:
                self.busy[rank].heard_at = time.monotonic()
            return
        if kind in ("done", "preempted") and rank in self.busy:
            self.store.release(self.busy.pop(rank).claim)
            if kind == "done":
                self.bar.update(1)
        if kind == "preempted":
            self.stop.request()   # that rank got the signal: the whole job is stopping
            self._begin_stopping()
        self._hand_out(rank)

    # -- hand-out ------------------------------------------------------------------------
    def _claim_next(self, rank: int) -> tuple[Task, Claim] | None:
        """The longest pending point nobody else holds, claimed for `rank`; None when there is
        none or the job is stopping."""
        worker = this_worker(0) if rank == 0 else {**self.where.get(rank, {}), "rank": rank}
        while self.queue and not self.stopping:
            task = self.queue.popleft()
            claim = self.store.try_claim(task.task_id, worker)
            if claim is not None:
                return task, claim
        return None

    def _hand_out(self, rank: int) -> None:
        claimed = self._claim_next(rank)
        if claimed is None:
            self.comm.send(None, dest=rank, tag=TAG_ASSIGN)
            self.released.add(rank)
            return
        task, claim = claimed
        self.busy[rank] = Assignment(task, claim, time.monotonic())
        self.comm.send(task, dest=rank, tag=TAG_ASSIGN)

    def _collect_own_point(self) -> bool:
        task = self.own.finished()
        if task is None:
            return False
        self.store.release(self.own_claim)
        if not self.own.preempted:
            self.executed.append(task.task_id)
            self.bar.update(1)
        return True

    def _start_own_point(self) -> bool:
        if not self.rank0_works or self.own.busy:
            return False
        claimed = self._claim_next(0)
        if claimed is None:
            return False
        task, self.own_claim = claimed
        self.own.start(task)
        return True

    # -- stop ----------------------------------------------------------------------------
    def _begin_stopping(self) -> None:
        if not self.stopping:
            self.stopping = True
            log.warning("stop requested (pre-timeout signal): running points save their last "
                        "complete epoch and stop; no new point starts")

    def _tell_busy_ranks_to_stop(self) -> None:
        for rank in self.busy:
            if rank not in self.told_to_stop:  # once: it answers "preempted" or "done"
                self.comm.send({"type": "stop"}, dest=rank, tag=TAG_STOP)
                self.told_to_stop.add(rank)

    # -- liveness ------------------------------------------------------------------------
    def _check_liveness(self) -> None:
        now = time.monotonic()
        for rank, assignment in self.busy.items():
            if now - assignment.heard_at > self.silence_timeout:
                raise RuntimeError(f"rank {rank} silent for {now - assignment.heard_at:.0f} s while "
                                   f"running {assignment.task.task_id}: assuming it died; aborting "
                                   f"the job")

    # -- termination ---------------------------------------------------------------------
    def _all_idle(self) -> bool:
        """Every worker released, rank 0's own point finished, nothing left to hand out."""
        return (len(self.released) == self.workers and not self.own.busy
                and (self.stopping or not self.queue))

    def _finished(self) -> bool:
        if not self._all_idle():
            return False
        # A working rank 0 waits for points claimed by other launches (below).
        return self.stopping or not self.rank0_works or not pending_tasks(self.grid, self.tasks)

    def _rescan_points_held_elsewhere(self) -> bool:
        """Queue again, once per heartbeat, the points other launches still hold: rank 0 runs
        those whose claim goes stale (a dead launch), so the grid ends complete."""
        if not self.rank0_works or self.stopping or not self._all_idle():
            return False
        if time.monotonic() - self.last_rescan < self.heartbeat:
            return False
        self.last_rescan = time.monotonic()
        self.queue.extend(pending_tasks(self.grid, self.tasks))
        return True

    def _close(self) -> None:
        self.bar.close()
        # Every worker was released, so the last posted receive can never match.
        cancel_receive(self.request)
        self.store.close()


class Worker:
    """A rank other than 0: asks for points, runs them, reports, sends heartbeats while busy."""

    def __init__(self, comm, run_point: RunPoint, stop: StopToken, *,
                 heartbeat: float = MPI_HEARTBEAT, silence_timeout: float = DEFAULT_SILENCE_TIMEOUT):
        self.comm, self.stop = comm, stop
        self.heartbeat, self.silence_timeout = heartbeat, silence_timeout
        self.runner = PointThread(run_point)
        self.executed: list[str] = []
        self.preempted = False
        self.stop_notice = None           # the posted receive of rank 0's TAG_STOP
        self.stop_received = False

    def run(self) -> tuple[list[str], bool]:
        """Work until rank 0 releases this rank; returns (the task ids it ran, whether it was
        stopped on request)."""
        self.stop_notice = self.comm.irecv(source=0, tag=TAG_STOP)
        self._report("ready", **this_worker())
        wait = max(self.silence_timeout, STARTUP_TIMEOUT)   # rank 0 may still be starting up
        try:
            while (task := self._next_assignment(wait)) is not None:
                wait = self.silence_timeout
                if self.stop.requested:   # signalled between points: give the task back unrun
                    self.preempted = True
                    self._report("preempted", task)
                    continue
                self._run(task)
        finally:
            if not self.stop_received:  # rank 0 sends at most one stop, only to a busy rank
                cancel_receive(self.stop_notice)
        return self.executed, self.preempted

    def _report(self, kind: str, task: Task | None = None, **extra) -> None:
        msg = {"type": kind, **extra} if task is None else {"type": kind, "task_id": task.task_id}
        self.comm.send(msg, dest=0, tag=TAG_REQUEST)

    def _next_assignment(self, wait: float) -> Task | None:
        """Rank 0's answer: the next task, or None when released; fails after `wait` seconds."""
        request = self.comm.irecv(source=0, tag=TAG_ASSIGN)
        deadline = time.monotonic() + wait
        while True:
            ok, task = request.test()
            if ok:
                return task
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank 0 did not answer for {wait:.0f} s: assuming it died; "
                                   f"aborting the job")
            time.sleep(POLL)

    def _run(self, task: Task) -> None:
        self.runner.start(task)
        last_beat = time.monotonic()
        while self.runner.busy:
            self.runner.thread.join(BUSY_POLL)
            self._check_stop_notice()
            if time.monotonic() - last_beat >= self.heartbeat:
                self._report("alive")
                last_beat = time.monotonic()
        self.runner.finished()
        if self.runner.preempted:
            self.preempted = True
            self._report("preempted", task)
        else:
            self.executed.append(task.task_id)
            self._report("done", task)

    def _check_stop_notice(self) -> None:
        if not self.stop_received:
            self.stop_received, _ = self.stop_notice.test()
            if self.stop_received:
                self.stop.request()   # rank 0 says the job is stopping


def run_static(comm, grid: GridPaths, run_point: RunPoint) -> list[str]:
    """Static striding: rank r runs pending tasks r, r+N, ... (only to compare in benchmarks; no
    preemption protocol)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    executed = []
    for task in pending_tasks(grid)[rank::size]:
        run_point(task)
        executed.append(task.task_id)
    barrier = comm.Ibarrier()  # polled, not blocking: a rank waits for the slowest one
    while not barrier.Test():
        time.sleep(POLL)
    return executed


# -- mpi4py, imported late ---------------------------------------------------------------------
def _receive_request(comm):
    """Post the receive of the next worker message, from any rank."""
    from mpi4py import MPI

    return comm.irecv(source=MPI.ANY_SOURCE, tag=TAG_REQUEST)


def _new_status():
    from mpi4py import MPI

    return MPI.Status()


def cancel_receive(request) -> None:
    """Cancel a posted receive that can no longer match, completing it without unpickling."""
    from mpi4py import MPI

    request.Cancel()
    MPI.Request.Wait(request)
