"""`bigticket slurm submit-pipeline`: the dependency chain, printed and submitted for real."""
from __future__ import annotations

import argparse
import io
import time

import pytest

from bigticket import slurm as pipeline
from tests.cluster.slurm_cluster import PYTHON, REPO

pytestmark = [pytest.mark.cluster]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    return parser.parse_args(["submit-pipeline", *argv])


def test_dry_run_chains_every_stage_with_afterok(tmp_path):
    out = io.StringIO()
    args = _args("--dataset", str(tmp_path / "ds"), "--runs", str(tmp_path / "runs"),
                 "--etl=--source digits --resize fixed:32", "--train=--model conv_small --epochs 2",
                 "--plan=--sparsities 0.5,0.9", "--lottery", "array",
                 "--sbatch=--account=proj --partition=gpu", "--train-sbatch=--nodes=4", "--dry-run")
    jobs = pipeline.submit_pipeline(args, out=out)
    lines = out.getvalue().splitlines()
    assert list(jobs) == ["etl", "train", "plan", "lottery", "report"] and len(lines) == 5
    assert "--dependency" not in lines[0] and "slurm/etl.sbatch --out" in lines[0]
    for line, before in zip(lines[1:], ["etl", "train", "plan", "lottery"]):
        assert f"--dependency=afterok:<{before}-job-id>" in line
        assert "--account=proj --partition=gpu" in line
    assert "--nodes=4" in lines[1] and "--nodes=4" not in lines[2]
    assert f"RESULT_FILE={tmp_path / 'runs' / '.pipeline' / 'train.run'}" in lines[1]
    assert "train_elephas.sbatch --data" in lines[1] and "--model conv_small --epochs 2" in lines[1]
    assert f"lottery_plan.sbatch @{tmp_path / 'runs' / '.pipeline' / 'train.run'} --sparsities 0.5,0.9" in lines[2]
    assert "lottery_array.sbatch @" in lines[3] and "report.sbatch @" in lines[4]
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_bad_quoting_names_the_flag(tmp_path):
    args = _args("--dataset", "d", "--runs", "r", "--train=--model 'unclosed", "--dry-run")
    with pytest.raises(pipeline.SubmitError, match="--train"):
        pipeline.submit_pipeline(args, out=io.StringIO())


@pytest.mark.slow
def test_a_failed_stage_stops_the_chain(slurm, tmp_path, monkeypatch):
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    out = io.StringIO()
    # Training on a dataset that does not exist fails fast; nothing after it may run.
    args = _args("--dataset", str(tmp_path / "missing"), "--runs", str(tmp_path / "runs"),
                 "--skip-etl", "--engine", "multiworker", "--train=--model conv_small",
                 "--python", str(PYTHON), "--repo", str(REPO),
                 f"--sbatch=--kill-on-invalid-dep=yes --output={tmp_path}/%x-%j.out",
                 "--train-sbatch=--gpus-per-task=0 --nodes=1 --ntasks-per-node=1 --cpus-per-task=1",
                 "--lottery-sbatch=--gpus-per-node=0 --nodes=1 --ntasks-per-node=1 --cpus-per-task=1")
    jobs = pipeline.submit_pipeline(args, out=out)
    assert out.getvalue().split() == [w for name, job in jobs.items() for w in (name, job)]
    assert slurm.wait_finished(jobs["train"], timeout=180) == "FAILED"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = {name: slurm.job_state(jobs[name]) for name in ("plan", "lottery", "report")}
        if all(s == "CANCELLED" for s in states.values()):
            break
        time.sleep(1)
    assert set(states.values()) == {"CANCELLED"}, states
    assert not (tmp_path / "runs" / ".pipeline" / "train.run").exists()
