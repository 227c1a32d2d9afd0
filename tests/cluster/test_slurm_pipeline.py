"""`bigticket slurm submit-pipeline`: the dependency chain, printed and submitted for real."""
from __future__ import annotations

import argparse
import io
import subprocess
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


def test_bad_stage_flags_are_refused_before_any_sbatch_line(tmp_path):
    """The command as typed: each stage's own parser and settings refuse its flags in a second,
    instead of jobs failing one after another hours later."""
    done = subprocess.run(
        [str(PYTHON), "-m", "bigticket", "slurm", "submit-pipeline", "--dataset", str(tmp_path / "ds"),
         "--runs", str(tmp_path / "runs"), "--dry-run", "--etl=--resize banana",
         "--train=--model resnet18 --rewind 0ep,banana", "--plan=--sparsities 1.5"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # not one sbatch line
    lines = done.stderr.splitlines()
    assert lines[0] == "bigticket slurm submit-pipeline: error: stage flags refused, nothing submitted:"
    refused = {line.split(" (")[0].strip(): line for line in lines[1:]}
    assert list(refused) == ["--etl", "--train", "--plan"], done.stderr
    assert "(bigticket etl prepare): --source is required" in refused["--etl"]
    assert "(bigticket train dense): --model: unknown model 'resnet18'" in refused["--train"]
    assert "--rewind: 'banana' is not a rewind point" in refused["--train"]
    assert "(bigticket lottery plan): --sparsities: 1.5 must lie strictly between 0 and 1" in refused["--plan"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags, refused", [
    (["--etl=--source digits --resize banana"],
     "--etl (bigticket etl prepare): --resize: expected fixed:N"),
    (["--etl=--source digits --bogus"], "--etl (bigticket etl prepare): unrecognized arguments: --bogus"),
    (["--train=--model conv_small --rewind 1ep", "--plan=--sparsities 0.5 --rewind init,2ep"],
     "--plan (bigticket lottery plan): --rewind: 2ep not saved by the training stage (it saves "
     "init, final, 1ep"),
    (["--plan=--sparsities 0.5 --early-bird --channel-ratios 0.3"],
     "--plan (bigticket lottery plan): --early-bird: the training stage does not run with --early-bird"),
    (["--lottery-args=--strategy fast"], "--lottery-args (bigticket lottery run): argument --strategy: "
                                         "invalid choice: 'fast'"),
])
def test_each_stage_is_checked_with_its_own_parser(tmp_path, flags, refused):
    valid = {"--etl": "--source digits", "--train": "--model conv_small", "--plan": "--sparsities 0.5"}
    given = {f.split("=")[0] for f in flags}
    args = _args("--dataset", str(tmp_path / "ds"), "--runs", str(tmp_path / "runs"),
                 *(f"{k}={v}" for k, v in valid.items() if k not in given), *flags, "--dry-run")
    out = io.StringIO()
    with pytest.raises(pipeline.SubmitError) as err:
        pipeline.submit_pipeline(args, out=out)
    assert refused in str(err.value) and out.getvalue() == ""
    assert len(str(err.value).splitlines()) == 2  # only that stage is refused


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
                 "--plan=--sparsities 0.5",
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


@pytest.mark.slow
def test_the_whole_chain_succeeds_under_slurm(slurm, tmp_path, monkeypatch, spark):
    """etl (Spark in SLURM) -> elephas training (Spark in SLURM) -> plan -> MPI grid -> report on
    digits at 8x8, submitted by submit-pipeline for real and followed to the end."""
    from pathlib import Path

    from common.atomic import read_json
    from common.paths import GridPaths
    from etl.verify import verify_dataset
    from lottery.grid.plan import done_ids, load_tasks

    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    # The Spark jobs keep their logs and scratch under the test's directory, not $HOME and /tmp.
    monkeypatch.setenv("SPARK_JOB_DIR", str(tmp_path / "sparkjob"))
    monkeypatch.setenv("SPARK_SCRATCH", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    dataset, runs = tmp_path / "digits8", tmp_path / "runs"
    cpu = "--gpus-per-node=0 --nodes=1 --ntasks-per-node=1 --cpus-per-task=1"
    args = _args("--dataset", str(dataset), "--runs", str(runs),
                 "--etl=--source digits --resize fixed:8 --format tfrecord --shards 1 --validation-shards 1",
                 "--train=--model lenet_300_100 --epochs 1 --batch-size 64 --lr 0.05 --augment none --workers 1",
                 "--plan=--sparsities 0.5,0.8 --epochs 1",
                 "--python", str(PYTHON), "--repo", str(REPO),
                 f"--sbatch=--kill-on-invalid-dep=yes --output={tmp_path}/%x-%j.out",
                 "--etl-sbatch=--nodes=1", f"--train-sbatch={cpu}",
                 "--lottery-sbatch=--gpus-per-node=0 --nodes=1 --ntasks-per-node=2 --cpus-per-task=1")
    jobs = pipeline.submit_pipeline(args, out=io.StringIO())
    assert list(jobs) == ["etl", "train", "plan", "lottery", "report"]

    def logs() -> str:
        return "".join(f"==> {p.name}\n{p.read_text()[-2500:]}" for p in sorted(tmp_path.glob("*.out")))

    state = slurm.wait_finished(jobs["report"], timeout=420)
    states = {name: slurm.completed_state(job) for name, job in jobs.items()}
    assert state == "COMPLETED" and set(states.values()) == {"COMPLETED"}, (states, logs())

    assert verify_dataset(dataset, spark=spark).ok
    run = Path((runs / ".pipeline" / "train.run").read_text().strip())
    assert run.parent == runs and (run / "_SUCCESS").is_file()
    grid = GridPaths(Path((runs / ".pipeline" / "lottery.grid").read_text().strip()))
    assert grid.root.parent == run
    ids = {t.task_id for t in load_tasks(grid.root)}
    assert len(ids) == 2 and done_ids(grid) == ids
    for task_id in ids:
        result = read_json(grid.result(task_id))["result"]
        assert 0.0 <= result["accuracy"] <= 1.0 and len(result["history"]) == 1
    report = grid.report.read_text()
    assert grid.results_csv.is_file() and "0.5" in report and "0.8" in report
