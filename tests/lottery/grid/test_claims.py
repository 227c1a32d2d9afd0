"""Claim files shared by real concurrent processes on one grid directory."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.atomic import read_json, write_json
from common.paths import GridPaths
from lottery.grid.claims import ClaimStore, list_claims
from lottery.grid.plan import done_ids, load_tasks
from lottery.grid.simulate import EXECUTOR, completed_executions, make_sleep_grid

REPO = Path(__file__).resolve().parents[3]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "SLURM_", "PMIX_", "MPI_LOCAL"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launch(grid, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lottery", "run", "--grid", str(grid.root), "--executor", EXECUTOR, *flags]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _claim_elsewhere(grid_root: str, task_id: str, conn) -> None:
    """A worker on another host: claims, reports, then dies without releasing (SIGKILL)."""
    store = ClaimStore(GridPaths(grid_root), owner="otherhost:1234:array0of2", heartbeat=0.2,
                       stale_after=1.0)
    conn.send(store.try_claim(task_id) is not None)
    time.sleep(60)


def test_claim_is_exclusive_and_a_result_means_done(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.1, 0.1])
    with ClaimStore(grid, "a", heartbeat=0.1, stale_after=1.0) as a, \
            ClaimStore(grid, "b", heartbeat=0.1, stale_after=1.0) as b:
        claim = a.try_claim("p000")
        assert claim is not None
        assert b.try_claim("p000") is None
        assert [(c.task_id, c.owner) for c in list_claims(grid)] == [("p000", "a")]
        time.sleep(1.5)   # longer than stale_after: only the heartbeat keeps the claim alive
        assert b.try_claim("p000") is None
        a.release(claim)
        assert list_claims(grid) == []
        write_json(grid.result("p001"), {"task_id": "p001"})
        assert b.try_claim("p001") is None   # done: nobody claims it again


def test_stale_claim_of_a_dead_worker_is_reclaimed(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.1])
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_claim_elsewhere, args=(str(grid.root), "p000", child))
    proc.start()
    try:
        assert parent.recv() is True
        with ClaimStore(grid, "rescuer", heartbeat=0.2, stale_after=1.0) as store:
            assert store.try_claim("p000") is None          # alive: heartbeat fresh
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            assert store.try_claim("p000") is None          # dead, but not stale yet (other host)
            assert list_claims(grid, stale_after=1.0)[0].stale is False
            time.sleep(1.6)
            assert list_claims(grid, stale_after=1.0)[0].stale is True
            claim = store.try_claim("p000")
            assert claim is not None
            assert json.loads(claim.path.read_text())["owner"] == "rescuer"
            asides = [p.name for p in grid.claims.iterdir() if ".stale-" in p.name]
            assert len(asides) == 1 and "otherhost" in (grid.claims / asides[0]).read_text()
    finally:
        if proc.is_alive():
            proc.kill()


def _race(grid_root: str, start: float, conn) -> None:
    store = ClaimStore(GridPaths(grid_root), owner=f"racer-{os.getpid()}", heartbeat=0.5, stale_after=5.0)
    while time.time() < start:
        pass
    conn.send(store.try_claim("p000") is not None)
    time.sleep(1.0)  # hold the claim while the others try


def test_only_one_of_many_concurrent_reclaimers_wins(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.1])
    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        # A stale claim (10 minutes without heartbeat) of a worker on another host.
        path = grid.claim("p000")
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"owner": "otherhost:1:x"}))
        old = time.time() - 600
        os.utime(path, (old, old))
        pipes, procs = [], []
        start = time.time() + 0.5
        for _ in range(6):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_race, args=(str(grid.root), start, child))
            p.start()
            pipes.append(parent)
            procs.append(p)
        wins = [c.recv() for c in pipes]
        for p in procs:
            p.join(10)
        assert sum(wins) == 1, (attempt, wins)
        for p in grid.claims.iterdir():
            p.unlink()


def test_two_launches_never_run_a_point_twice(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.4, 0.3, 0.3, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1])
    a = launch(grid, "--array-index", "0", "--array-count", "2")
    b = launch(grid, "--array-index", "1", "--array-count", "2")
    outs = [p.communicate(timeout=60) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    ids = {t.task_id for t in load_tasks(grid.root)}
    assert done_ids(grid) == ids
    assert completed_executions(grid.root) == {i: 1 for i in ids}
    pids = {read_json(grid.result(i))["worker"]["pid"] for i in ids}
    assert pids == {a.pid, b.pid}   # both launches did work
    assert {read_json(grid.result(i))["worker"]["mode"] for i in ids} == {"array"}
    assert list(grid.claims.glob("*.claim")) == []


def test_a_killed_launch_is_finished_by_the_next_one(tmp_path):
    grid = make_sleep_grid(tmp_path, [0.3, 0.2, 0.2, 0.1], params={1: {"kill_once": True}})
    first = launch(grid)
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert grid.claim("p001").exists()       # left behind by the dead process
    second = launch(grid, "--stale-after", "600")   # reclaimed at once: its owner's pid is gone
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert "4/4 points done" in out
    ids = {t.task_id for t in load_tasks(grid.root)}
    assert completed_executions(grid.root) == {i: 1 for i in ids}


def test_status_shows_progress_running_claims_and_eta(tmp_path):
    from lottery.report.progress import grid_progress

    grid = make_sleep_grid(tmp_path, [3.0, 2.0, 0.1])   # run longest first
    cmd = [sys.executable, "-m", "lottery", "status", "--grid", str(grid.root)]
    before = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert "points done: 0/3" in before.stdout and "ETA: unknown" in before.stdout
    worker = launch(grid, "--heartbeat", "0.2", "--stale-after", "2")
    # Wait for the state under test: the 3 s point done and the 2 s point running (claimed).
    # Between two points the worker briefly holds no claim, so sample until both hold.
    deadline = time.time() + 30
    progress = grid_progress(grid.root, stale_after=2)
    while not (progress["done"] == 1 and progress["running"]) and time.time() < deadline:
        time.sleep(0.02)
        progress = grid_progress(grid.root, stale_after=2)
    worker.communicate(timeout=60)
    assert worker.returncode == 0
    assert (progress["total"], progress["done"], progress["pending"]) == (3, 1, 1)  # 1 running
    assert [r["task_id"] for r in progress["running"]] == ["p001"]
    assert progress["running"][0]["owner"].startswith(socket.gethostname())
    # ETA from the measured rate: 3 s per 3.0 of cost, 2.1 of cost left, one worker: about 2.1 s.
    assert 1.6 < progress["eta_seconds"] < 3.0
    after = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert "points done: 3/3" in after.stdout and "running: 0" in after.stdout
    assert "ETA: 0s (complete)" in after.stdout


@pytest.mark.cluster
def test_status_under_mpi_shows_each_running_point_with_its_rank_and_host(tmp_path):
    """Rank 0 claims for every rank: the claims name the rank and host that run each point, and
    running points are counted as running, not pending."""
    from lottery.report.progress import format_progress, grid_progress

    grid = make_sleep_grid(tmp_path, [6.0, 6.0, 6.0, 0.2, 0.2, 0.2])
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", "3", sys.executable, "-m", "mpi4py", "-m", "lottery", "run",
           "--grid", str(grid.root), "--executor", EXECUTOR]
    job = subprocess.Popen(cmd, cwd=REPO, env={**_env(), "CUDA_VISIBLE_DEVICES": ""},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    progress = grid_progress(grid.root)
    while len(progress["running"]) < 3 and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
        progress = grid_progress(grid.root)
    status = subprocess.run([sys.executable, "-m", "lottery", "status", "--grid", str(grid.root)],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    running = progress["running"]
    assert sorted(r["rank"] for r in running) == [0, 1, 2], progress
    assert {r["host"] for r in running} == {socket.gethostname()}
    assert len({r["pid"] for r in running}) == 3     # each rank's own process, not rank 0's
    assert (progress["done"], progress["pending"]) == (0, 3)   # 6 points: 3 running, 3 pending
    assert "points done: 0/6 (3 running, 3 pending)" in format_progress(progress)
    # the same from the command, polled while the job ran
    assert "points done: 0/6 (3 running, 3 pending)" in status.stdout, status.stdout
    for rank in (1, 2):
        assert re.search(rf"rank {rank} on {re.escape(socket.gethostname())} \(pid \d+\)",
                         status.stdout), status.stdout
    # and `lottery run` said where it runs without claiming a GPU the host does not have
    assert "CPU (no GPU visible)" in err and "GPU 0" not in err
