"""The grid scheduler under real `mpiexec` (MPICH Hydra), with a sleep workload."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.atomic import read_json
from lottery.grid.plan import done_ids, load_tasks
from lottery.grid.scheduler import WorldSizeError, check_world_size
from lottery.grid.simulate import EXECUTOR, completed_executions, make_sleep_grid

pytestmark = [pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # A launcher's variables from an enclosing job would confuse the world-size check.
    for name in list(env):
        if name.startswith(("PMI_", "OMPI_", "SLURM_", "PMIX_", "MPI_LOCAL")):
            del env[name]
    env.update(extra)
    return env


def mpirun(n: int, grid, *flags: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "lottery", "run",
           "--grid", str(grid.root), "--executor", EXECUTOR, *flags]
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def assert_complete_once(grid):
    ids = {t.task_id for t in load_tasks(grid.root)}
    assert done_ids(grid) == ids
    counts = completed_executions(grid.root)
    assert counts == {i: 1 for i in ids}, counts
    for task_id in ids:  # the result belongs to its task (no mix-up between ranks)
        record = read_json(grid.result(task_id))
        assert record["task_id"] == task_id and record["task"]["task_id"] == task_id


def test_dynamic_handout_longest_first_on_every_rank(tmp_path):
    durations = [0.2, 0.9, 0.3, 0.8, 0.2, 0.7, 0.3, 0.2, 0.4, 0.3]
    grid = make_sleep_grid(tmp_path, durations)
    proc = mpirun(3, grid)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_complete_once(grid)
    records = [read_json(grid.result(t.task_id)) for t in load_tasks(grid.root)]
    assert {r["worker"]["rank"] for r in records} == {0, 1, 2}   # rank 0 works too
    # The three points started first are the three longest: dynamic, longest first.
    first = sorted(records, key=lambda r: r["started_at"])[:3]
    assert sorted(r["task"]["params"]["duration"] for r in first) == [0.7, 0.8, 0.9]
    # Workers ask when idle and get the next point at once: no rank waits between its points.
    # A gap also holds the fsync of the point's result file, which a busy CI disk once stretched
    # to 0.9 s for each rank's first point, so the scheduler's latency is judged by the median gap
    # (a scheduler that waited for rounds or polled slowly moves it); the worst gap must only stay
    # far under the 5 s heartbeat, which is what a lost request would cost.
    by_rank = {}
    for r in sorted(records, key=lambda r: r["started_at"]):
        by_rank.setdefault(r["worker"]["rank"], []).append(r)
    gaps = [b["started_at"] - a["finished_at"] for rs in by_rank.values() for a, b in zip(rs, rs[1:])]
    assert len(gaps) == len(records) - 3, gaps
    assert statistics.median(gaps) < 0.1 and max(gaps) < 2.5, gaps
    # Re-running a finished grid trains nothing.
    again = mpirun(2, grid)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this launch ran 0" in again.stdout
    assert_complete_once(grid)


def test_sigkilled_rank_ends_the_job_and_a_rerun_completes(tmp_path):
    durations = [0.6, 0.5, 0.5, 0.4, 0.4, 0.3, 0.3, 0.2]
    grid = make_sleep_grid(tmp_path, durations, params={3: {"kill_once": True}})
    t0 = time.monotonic()
    proc = mpirun(3, grid, timeout=90)
    assert time.monotonic() - t0 < 60
    assert proc.returncode != 0
    killed = load_tasks(grid.root)
    assert (tmp_path / "dense-test" / "killed-p003").exists()   # the fault really fired
    assert "p003" not in done_ids(grid)
    rerun = mpirun(2, grid)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_complete_once(grid)
    assert len(killed) == len(durations)


def test_a_silent_rank_is_detected_and_the_job_aborts(tmp_path):
    # SIGSTOP: the process stays alive, so the launcher does not notice; only our heartbeat can.
    grid = make_sleep_grid(tmp_path, [0.3, 0.3, 0.3, 0.3, 0.3, 0.2],
                           params={1: {"stop_once": True}})
    t0 = time.monotonic()
    proc = mpirun(2, grid, "--heartbeat", "0.3", "--silence-timeout", "3", timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 30
    # Whichever rank was stopped, the other one noticed: rank 0 (a worker went silent) or the
    # worker (rank 0 stopped answering).
    assert "silent for" in proc.stderr or "rank 0 did not answer" in proc.stderr
    rerun = mpirun(2, grid, "--heartbeat", "0.3", "--silence-timeout", "3")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_complete_once(grid)


def test_a_failing_point_aborts_the_job_quickly(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.2, 5.0, 5.0, 5.0], params={0: {"fail": True}})
    t0 = time.monotonic()
    proc = mpirun(2, grid, timeout=60)
    assert proc.returncode != 0
    assert "workload asked to fail on" in proc.stderr
    assert time.monotonic() - t0 < 20


def test_static_striding_strategy_runs_each_point_once(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.3, 0.2, 0.2, 0.1, 0.1])
    proc = mpirun(2, grid, "--strategy", "static")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_complete_once(grid)
    ranks = {t: read_json(grid.result(t))["worker"]["rank"] for t in done_ids(grid)}
    order = [t.task_id for t in load_tasks(grid.root)]
    assert [ranks[t] for t in order] == [0, 1, 0, 1, 0]


def test_world_size_mismatch_is_refused(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.1, 0.1])
    # What a foreign launcher looks like: it asked for 2 processes, MPI sees a world of 1.
    cmd = [sys.executable, "-m", "mpi4py", "-m", "lottery", "run", "--grid", str(grid.root),
           "--executor", EXECUTOR]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "MPI world size is 1 but the launcher asked for 2" in proc.stderr
    assert done_ids(grid) == set()
    with pytest.raises(WorldSizeError, match="asked for 4"):
        check_world_size(1, {"SLURM_NTASKS": "4"})
    check_world_size(2, {"PMI_SIZE": "2", "SLURM_NTASKS": "8"})  # the launcher's own count wins


def test_without_mpi_one_process_runs_the_grid(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.1, 0.2, 0.1])
    cmd = [sys.executable, "-m", "lottery", "run", "--grid", str(grid.root), "--executor", EXECUTOR]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3/3 points done" in proc.stdout
    assert_complete_once(grid)
    assert {read_json(grid.result(t))["worker"]["mode"] for t in done_ids(grid)} == {"single"}


def test_run_on_an_unplanned_directory_names_it(tmp_path):
    cmd = [sys.executable, "-m", "lottery", "run", "--grid", str(tmp_path / "nothing")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "nothing: not a planned lottery grid" in proc.stderr
