"""slurm/lottery_mpi.sbatch and slurm/lottery_array.sbatch under a real SLURM, with a sleep workload."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from common.atomic import read_json
from lottery.grid.plan import done_ids, load_tasks
from lottery.grid.simulate import EXECUTOR, completed_executions, make_sleep_grid
from tests.cluster.slurm_cluster import PYTHON, REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

WORKLOAD = EXECUTOR
# The test cluster has no GPUs: the scripts' --gpus-per-node/--gpus are overridden on sbatch's line.
JOB_ENV = {"PYTHONPATH": str(REPO), "PYTHON": str(PYTHON)}


def assert_complete_once(grid):
    ids = {t.task_id for t in load_tasks(grid.root)}
    assert done_ids(grid) == ids
    assert completed_executions(grid.root) == {i: 1 for i in ids}
    for task_id in ids:
        assert read_json(grid.result(task_id))["task_id"] == task_id


def test_dry_runs_print_the_launch_lines(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": str(PYTHON), "BIGTICKET_HOME": str(REPO),
           "SLURM_NTASKS": "8", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_COUNT": "8"}
    mpi = subprocess.run(["bash", str(REPO / "slurm" / "lottery_mpi.sbatch"), str(tmp_path / "g")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert mpi.returncode == 0, mpi.stderr
    assert f"mpiexec -n 8 {PYTHON} -m mpi4py -m lottery run --grid {tmp_path / 'g'}" in mpi.stdout
    array = subprocess.run(["bash", str(REPO / "slurm" / "lottery_array.sbatch"), str(tmp_path / "g")],
                           env=env, capture_output=True, text=True, timeout=60)
    assert array.returncode == 0, array.stderr
    assert "--array-index 4 --array-count 8" in array.stdout  # 0-based from --array=1-8


def test_mpi_grid_survives_a_pre_timeout_signal_and_requeue(slurm, tmp_path):
    grid = make_sleep_grid(tmp_path, [1.5] * 8)
    done = slurm.sbatch(["--parsable", "--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2",
                         "--cpus-per-task=1", "--output", str(tmp_path / "job-%j.out"),
                         str(REPO / "slurm" / "lottery_mpi.sbatch"), str(grid.root),
                         "--executor", WORKLOAD], env=JOB_ENV, cwd=REPO)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while len(done_ids(grid)) < 2:  # mid-grid: some points done, others running
        assert time.monotonic() < deadline and slurm.job_state(job) in ("PENDING", "RUNNING")
        time.sleep(0.3)
    # What `--signal=B:USR1@120` does at the time limit, now: the script stops and requeues.
    signal = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env,
                            capture_output=True, text=True, timeout=30)
    assert signal.returncode == 0, signal.stderr
    assert slurm.wait_finished(job, timeout=240) == "COMPLETED"
    log = (tmp_path / f"job-{job}.out").read_text()
    assert "pre-timeout signal (restart 0)" in log and "restart count 1" in log, log[-3000:]
    assert_complete_once(grid)


def test_array_elements_share_the_grid(slurm, tmp_path):
    grid = make_sleep_grid(tmp_path, [0.5] * 6)
    done = slurm.sbatch(["--wait", "--array=1-2", "--gpus=0", "--cpus-per-task=1",
                         "--output", str(tmp_path / "job-%A_%a.out"),
                         str(REPO / "slurm" / "lottery_array.sbatch"), str(grid.root),
                         "--executor", WORKLOAD], env=JOB_ENV, cwd=REPO, timeout=240)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("job-*.out")))
    assert done.returncode == 0, done.stderr + logs[-3000:]
    assert "--array-index 0 --array-count 2" in logs and "--array-index 1 --array-count 2" in logs
    assert_complete_once(grid)


@pytest.fixture(scope="module")
def dense_run(spark, tmp_path_factory):
    from tests.lottery.grid.test_preemption import digits_dense_run

    return digits_dense_run(spark, tmp_path_factory.mktemp("slurm-preempt"))


def test_pre_timeout_signal_checkpoints_running_points_and_the_requeued_job_resumes_them(
        slurm, dense_run, tmp_path):
    """Real training under lottery_mpi.sbatch: SLURM's pre-timeout signal (sent now with
    `scancel --signal=USR1 --batch`, as `--signal=B:USR1@120` would near the limit) reaches the
    batch shell, which TERMs mpiexec; the ranks save their last complete epoch and exit 75; the
    script requeues; the requeued job resumes those points and trains no epoch twice."""
    from tests.lottery.grid.test_preemption import EPOCHS, check_resumed, plan_points

    grid = plan_points(dense_run, "0.5,0.8")
    ids = [t.task_id for t in load_tasks(grid.root)]
    done = slurm.sbatch(["--parsable", "--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2",
                         "--cpus-per-task=1", "--output", str(tmp_path / "job-%j.out"),
                         str(REPO / "slurm" / "lottery_mpi.sbatch"), str(grid.root)],
                        env=JOB_ENV, cwd=REPO)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    log_path = tmp_path / f"job-{job}.out"

    def saved(task_id):
        try:
            return read_json(grid.partial_state(task_id) / "state.json")["epochs_done"]
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    deadline = time.monotonic() + 240
    while not all(saved(t) >= 2 for t in ids):   # both points running, mid-way
        state = slurm.job_state(job)
        assert time.monotonic() < deadline and state in ("PENDING", "RUNNING"), \
            (state, log_path.read_text()[-3000:] if log_path.exists() else "")
        time.sleep(0.3)
    assert all(saved(t) < EPOCHS for t in ids)
    signal = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env,
                            capture_output=True, text=True, timeout=30)
    assert signal.returncode == 0, signal.stderr
    assert slurm.wait_finished(job, timeout=300) == "COMPLETED", log_path.read_text()[-4000:]
    log = log_path.read_text()
    assert "pre-timeout signal (restart 0)" in log, log[-3000:]
    assert "launcher exited with status 75" in log and "restart count 1" in log, log[-3000:]
    check_resumed(grid, {t: None for t in ids}, log)
    assert EPOCHS == len(read_json(grid.result(ids[0]))["result"]["history"])


def test_array_dry_run_outside_an_array_job_shows_element_0(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": str(PYTHON), "BIGTICKET_HOME": str(REPO)}
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        env.pop(name, None)
    done = subprocess.run(["bash", str(REPO / "slurm" / "lottery_array.sbatch"), str(tmp_path / "g")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"+ {PYTHON} -m lottery run --grid {tmp_path / 'g'} --array-index 0 --array-count 8 "
        "--stale-after 120 &"]
    assert "not a job-array element: showing element 0 of 8" in done.stderr
