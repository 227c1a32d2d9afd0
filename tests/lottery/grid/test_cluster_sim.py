"""The simulated cluster of bench/cluster_sim.py, small: real mpiexec ranks and real claim-mode
processes on sleep points, ranks and processes SIGKILLed mid-point, then every point done exactly
once by the records of lottery.grid.simulate. Also the audit's own checks and the ideal schedule."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.atomic import read_json
from common.stop import StopToken
from lottery.grid.plan import done_ids, load_tasks
from lottery.grid.scheduler import run_grid
from lottery.grid.simulate import (
    EXECUTOR,
    audit,
    fit_lognormal,
    lognormal_durations,
    lpt_makespan,
    make_sleep_grid,
    read_executions,
    running_points,
    sleep_point,
    starts_dir,
)

REPO = Path(__file__).resolve().parents[3]
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "SLURM_", "PMIX_", "MPI_LOCAL"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["BIGTICKET_LOG_LEVEL"] = "WARNING"
    return env


def _launch(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT)


def _run_cmd(grid) -> list[str]:
    return [sys.executable, "-m", "lottery", "run", "--grid", str(grid.root), "--executor", EXECUTOR]


def _wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def _victim(grid, durations: dict[str, float], eligible) -> object:
    """A running point, of an eligible process, with at least 0.4 s left to run."""
    def find():
        now = time.time()
        for e in running_points(grid.root):
            if eligible(e) and e.called_at + durations[e.task_id] - now >= 0.4:
                return e
        return None
    return _wait_for(find, 30)


def _assert_rerun_once(grid, victim, killed_at: float) -> None:
    later = [e for e in read_executions(grid.root)
             if e.task_id == victim.task_id and e.called_at > killed_at]
    assert len(later) == 1 and later[0].returned_at is not None, later
    assert read_json(grid.result(victim.task_id))["result"]["execution"] == later[0].execution


def _grid(tmp_path, n: int):
    # The bench's calibrated shape (sigma of real point times), shrunk to sub-second points.
    durations = [min(d, 2.5) for d in lognormal_durations(n, 0.5, 0.86, seed=3)]
    grid = make_sleep_grid(tmp_path, durations)
    return grid, {t.task_id: t.params["duration"] for t in load_tasks(grid.root)}


# -- the ideal schedule and the calibration ----------------------------------------------------
def test_lpt_makespan_and_lognormal_fit():
    assert lpt_makespan([5, 4, 3, 3, 3], 2) == 10    # 5+3 | 4+3+3
    assert lpt_makespan([5, 4, 3, 3, 3], 2, ready_at=[0, 6]) == 12
    assert lpt_makespan([1.0] * 8, 4) == 2
    with pytest.raises(ValueError, match="ready_at"):
        lpt_makespan([1], 2, ready_at=[0])
    median, sigma = fit_lognormal(lognormal_durations(20000, 2.0, 0.8, seed=1))
    assert median == pytest.approx(2.0, rel=0.03) and sigma == pytest.approx(0.8, rel=0.05)


# -- the audit ---------------------------------------------------------------------------------
def test_audit_flags_lost_duplicated_and_concurrent_points(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.05, 0.05, 0.05])
    run_grid(grid.root, executor=EXECUTOR)
    clean = audit(grid, {})
    assert clean.ok and clean.summary()["executions"] == 3 and not clean.interrupted
    first, second, third = (t.task_id for t in load_tasks(grid.root))
    by_id = {t.task_id: t for t in load_tasks(grid.root)}

    # A point whose result is gone is lost.
    grid.result(third).rename(tmp_path / "aside.json")
    assert audit(grid, {}).lost == [third]
    (tmp_path / "aside.json").rename(grid.result(third))

    # A dead process's start without a completion, before the committed run: work lost to a
    # fault, not a duplicate. Without its death time, it may still have been running: concurrent.
    committed = next(e for e in read_executions(grid.root) if e.task_id == first)
    dead_pid = 2 ** 22 + 17
    record = {"task_id": first, "execution": "killed", "pid": dead_pid, "rank": 3,
              "called_at": committed.called_at - 5}
    (starts_dir(grid.root) / f"{first}@killed").write_text(json.dumps(record))
    assert audit(grid, {}).concurrent == [first]
    faulted = audit(grid, {dead_pid: committed.called_at - 1})
    assert faulted.ok and faulted.interrupted == {first: 1}

    # Running a done point again (what a broken scheduler would do) is a duplicate.
    sleep_point(grid.root.parent, grid.root, by_id[second], {}, StopToken())
    assert audit(grid, {dead_pid: committed.called_at - 1}).duplicated == [second]


def test_audit_tells_a_completion_killed_before_its_commit_from_a_rerun_of_a_done_point(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.05])
    task = load_tasks(grid.root)[0]
    before = time.time()
    # A process completed the point and was killed before writing its result (no result file),
    # then a later launch ran and committed it.
    sleep_point(grid.root.parent, grid.root, task, {}, StopToken())
    killed = read_executions(grid.root)[0]
    run_grid(grid.root, executor=EXECUTOR)
    # Both completions ran in this test's process: the second start makes the first one look
    # committed, as it would be, had the process lived on; so rename its pid to a dead one.
    for sub in ("starts", "executions"):
        path = grid.root.parent / sub / f"{task.task_id}@{killed.execution}"
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "pid": 2 ** 22 + 5}))
    died_at = {2 ** 22 + 5: killed.returned_at}
    result = audit(grid, died_at, [(before, frozenset())])
    assert result.ok and result.uncommitted == [task.task_id]
    # Had the result existed when the process died, the second run re-ran a done point.
    assert audit(grid, died_at, [(killed.returned_at, {task.task_id})]).duplicated == [task.task_id]


# -- the simulated cluster, small --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.cluster
def test_mpi_ranks_killed_mid_point_then_the_same_command_completes_every_point_once(tmp_path):
    ranks = 12
    grid, durations = _grid(tmp_path, 60)
    log = tmp_path / "mpi.log"
    cmd = [str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "mpi4py", *_run_cmd(grid)[1:]]
    started = time.time()
    job = _launch(cmd, log)
    _wait_for(lambda: len(done_ids(grid)) >= 10, 90)
    victim = _victim(grid, durations, lambda e: e.rank != 0)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    assert job.wait(timeout=60) != 0, log.read_text()[-3000:]     # MPICH ends the whole job
    ended = time.time()
    done_then = frozenset(done_ids(grid))
    assert victim.task_id not in done_then
    # Every rank of the first job died with it (killed by the launcher's teardown).
    died_at = {e.pid: ended for e in read_executions(grid.root) if started <= e.called_at <= ended}
    died_at[victim.pid] = killed_at

    rerun = _launch(cmd, log)
    assert rerun.wait(timeout=120) == 0, log.read_text()[-3000:]
    result = audit(grid, died_at, [(ended, done_then)])
    assert result.ok, result.summary()
    assert done_ids(grid) == set(durations)
    assert result.interrupted.get(victim.task_id) == 1
    _assert_rerun_once(grid, victim, killed_at)
    # Only what the first job left unfinished ran again.
    rerun_ids = {e.task_id for e in read_executions(grid.root) if e.called_at > ended}
    assert rerun_ids == set(durations) - done_then


@pytest.mark.slow
@pytest.mark.cluster
def test_array_elements_sharing_claims_one_killed_and_requeued_complete_every_point_once(tmp_path):
    count = 12
    grid, durations = _grid(tmp_path, 48)
    log = tmp_path / "array.log"

    def element(i: int) -> subprocess.Popen:
        return _launch(_run_cmd(grid) + ["--array-index", str(i), "--array-count", str(count)], log)

    procs = [element(i) for i in range(count)]
    _wait_for(lambda: len(done_ids(grid)) >= 8, 90)
    pids = {p.pid: i for i, p in enumerate(procs)}
    victim = _victim(grid, durations, lambda e: e.pid in pids)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    assert procs[pids[victim.pid]].wait(timeout=30) == -signal.SIGKILL
    died_at = {victim.pid: time.time()}
    snapshot = (time.time(), frozenset(done_ids(grid)))
    time.sleep(0.3)                                               # the requeue's delay
    requeued = element(pids[victim.pid])
    for p in [p for p in procs if p.pid != victim.pid] + [requeued]:
        assert p.wait(timeout=120) == 0, log.read_text()[-3000:]
    result = audit(grid, died_at, [snapshot])
    assert result.ok, result.summary()
    assert done_ids(grid) == set(durations)
    assert result.interrupted == {victim.task_id: 1}
    _assert_rerun_once(grid, victim, killed_at)
    assert {read_json(grid.result(t))["worker"]["mode"] for t in durations} == {"array"}
