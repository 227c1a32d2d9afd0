"""Robustness grids (lottery.grid.robustness_plan, lottery.points.robustness): planned from the
finished points of a real grid, run by the real scheduler, resumable and idempotent; plus
adversarial retraining of grid points."""
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
from lottery.grid.robustness_plan import load_robustness_results, plan_robustness, robustness_task_id
from lottery.grid.scheduler import run_grid
from train.attacks import AttackConfig

REPO = Path(__file__).resolve().parents[3]
PGD3 = AttackConfig(steps=3)


@pytest.fixture(scope="module")
def grid(digits_dir, tmp_path_factory):
    """LeNet-300-100, 2 dense epochs; a grid at sparsity 0.8 with a random re-init control,
    retrained adversarially (PGD-2 at eps 0.1) for one epoch."""
    from lottery.grid.plan import plan
    from lottery.grid.settings import GridSettings
    from train.run import train_dense
    from train.settings import DenseSettings

    run = train_dense(DenseSettings(data=str(digits_dir), model="lenet_300_100", epochs=2,
                                    out=str(tmp_path_factory.mktemp("runs")), batch_size=64,
                                    augment="none"))
    paths = plan(run.root, GridSettings(sparsities=(0.8,), controls=("random_reinit",), epochs=1,
                                        adversarial="pgd", adv_epsilon=0.1, adv_steps=2))
    run_grid(paths.root)
    return paths


def _mtimes(sub) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sub.results.glob("*.json")}


def test_points_keep_their_network_and_record_adversarial_retraining(grid):
    records = [read_json(p) for p in grid.results.glob("*.json")]
    assert len(records) == 2
    for record in records:
        assert (grid.models / f"{record['task_id']}.keras").is_file()
        assert record["result"]["adversarial_training"]["adv_epsilon"] == 0.1


def test_robustness_grid_runs_once_and_extends_with_new_epsilons(grid):
    sub = plan_robustness(grid.root, PGD3, [0.0, 0.1])
    assert len(json.loads(sub.settings.read_text())["tasks"]) == 6  # (dense + 2 points) x 2 eps
    first = run_grid(sub.root)
    assert len(first.executed) == 6
    before = _mtimes(sub)
    again = run_grid(sub.root)  # nothing missing: nothing runs, nothing is rewritten
    assert again.executed == [] and _mtimes(sub) == before
    assert plan_robustness(grid.root, PGD3, [0.0, 0.1]) == sub  # same attack, same directory
    plan_robustness(grid.root, PGD3, [0.1, 0.2])  # one new epsilon: 3 new tasks
    third = run_grid(sub.root)
    assert sorted(third.executed) == sorted(robustness_task_id(t, 0.2) for t in
                                            ("dense", *(r.stem for r in grid.results.glob("*.json"))))
    assert {k: v for k, v in _mtimes(sub).items() if k in before} == before

    rows = load_robustness_results(grid.root)
    dense = {r["epsilon"]: r["robust_accuracy"] for r in rows if r["target"] == "dense"}
    history = (grid.root.parent / "history.csv").read_text().splitlines()
    val_acc = float(history[-1].split(",")[history[0].split(",").index("val_accuracy")])
    assert dense[0.0] == pytest.approx(val_acc, abs=1e-4)  # eps 0 is the clean evaluation
    assert dense[0.2] <= dense[0.1] + 0.01 <= dense[0.0] + 0.02
    for row in rows:
        if row["target"] != "dense" and row["epsilon"] == 0.0:
            point = read_json(grid.result(row["target"]))["result"]
            assert row["robust_accuracy"] == pytest.approx(point["accuracy"], abs=1e-4)
            assert row["control"] == point["control"] and row["sparsity"] == point["sparsity"]


def test_a_killed_run_resumes_with_only_the_missing_tasks(grid, tmp_path):
    sub = plan_robustness(grid.root, AttackConfig(steps=40, restarts=2), [0.05, 0.1])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "bigticket", "lottery", "run", "--grid", str(sub.root)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list(sub.results.glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # no clean stop: a claim may be left behind
    proc.wait()
    before = _mtimes(sub)
    assert 1 <= len(before) < 6
    summary = run_grid(sub.root, stale_after=1.0, heartbeat=0.2)
    assert summary.done_at_end == 6
    # Only the missing tasks ran (the killed launch's claim was reclaimed once stale).
    assert sorted(summary.executed) == sorted(n[:-5] for n in set(_mtimes(sub)) - set(before))
    assert {k: v for k, v in _mtimes(sub).items() if k in before} == before


def test_points_without_a_saved_network_are_skipped(grid, caplog):
    victim = sorted(grid.models.glob("*.keras"))[0]
    kept = victim.read_bytes()
    victim.unlink()
    try:
        sub = plan_robustness(grid.root, AttackConfig("fgsm"), [0.1])
        targets = {t["params"]["target"] for t in json.loads(sub.settings.read_text())["tasks"]}
        assert victim.stem not in targets and "dense" in targets and len(targets) == 2
        assert "no saved network" in caplog.text
    finally:
        victim.write_bytes(kept)
