"""`bigticket slurm submit-pipeline`: submit etl -> train -> plan -> lottery -> report to SLURM.

Each stage is one of the sbatch scripts in slurm/, submitted with `sbatch --parsable` and
`--dependency=afterok:<previous job>`, so a stage starts only when the one before it succeeded
(add `--sbatch=--kill-on-invalid-dep=yes` to have SLURM cancel the rest of a failed chain).
Stages hand paths on through small files in --state-dir: the training job saves its run
directory, the plan job its grid directory.

Before the first sbatch, every stage's flags are parsed by that stage's own parser and turned into
its settings, as the job will do hours later; anything refused stops the submission (exit 2),
naming the stage and the flag. Checks that need files the chain has yet to write (the dataset, the
dense run) are left to the jobs.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from common.cli import remember_prog, usage_error
from common.logs import setup_logging
from etl import cli as etl_cli
from lottery import cli as lottery_cli
from train import cli as train_cli

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPTS = {"elephas": "train_elephas.sbatch", "multiworker": "train_multiworker.sbatch"}
LOTTERY_SCRIPTS = {"mpi": "lottery_mpi.sbatch", "array": "lottery_array.sbatch"}


class SubmitError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    script: Path
    args: list[str]
    env: dict[str, str]


def _words(flag: str, text: str | None) -> list[str]:
    try:
        return shlex.split(text or "")
    except ValueError as err:
        raise SubmitError(f"{flag}: {err}") from None


def pipeline_stages(args: argparse.Namespace) -> list[Stage]:
    slurm_dir = Path(args.repo) / "slurm"
    state = Path(args.state_dir or Path(args.runs) / ".pipeline")
    run_file, grid_file = state / "train.run", state / "lottery.grid"
    stages = []
    if not args.skip_etl:
        stages.append(Stage("etl", slurm_dir / "etl.sbatch",
                            ["--out", str(args.dataset), *_words("--etl", args.etl)], {}))
    stages += [
        Stage("train", slurm_dir / TRAIN_SCRIPTS[args.engine],
              ["--data", str(args.dataset), "--out", str(args.runs), *_words("--train", args.train)],
              {"RESULT_FILE": str(run_file)}),
        Stage("plan", slurm_dir / "lottery_plan.sbatch", [f"@{run_file}", *_words("--plan", args.plan)],
              {"RESULT_FILE": str(grid_file)}),
        Stage("lottery", slurm_dir / LOTTERY_SCRIPTS[args.lottery],
              [f"@{grid_file}", *_words("--lottery-args", args.lottery_args)], {}),
        Stage("report", slurm_dir / "report.sbatch", [f"@{grid_file}"], {}),
    ]
    for stage in stages:
        if not stage.script.is_file():
            raise SubmitError(f"--repo {args.repo}: {stage.script} not found")
    return stages


class _StageFlagError(Exception):
    pass


class _CheckingParser(argparse.ArgumentParser):
    """A stage's own parser that raises where argparse would print usage and exit."""

    def error(self, message: str):
        raise _StageFlagError(message)

    def exit(self, status: int = 0, message: str | None = None):
        raise _StageFlagError((message or "").strip() or "--help/--version is not a stage flag")


def _parse(add_arguments, prog: str, argv: list[str]) -> argparse.Namespace:
    parser = _CheckingParser(prog=prog)
    add_arguments(parser)
    return parser.parse_args(argv)


# Where the pipeline's placeholders stand for paths the chain writes later (never read here).
_LATER = "<written-by-the-previous-stage>"


def _check_etl(args: argparse.Namespace) -> None:
    ns = _parse(etl_cli.add_arguments, "bigticket etl",
                ["prepare", "--out", str(args.dataset), *_words("--etl", args.etl)])
    etl_cli.settings_from_args(ns)


def _check_train(args: argparse.Namespace):
    ns = _parse(train_cli.add_arguments, "bigticket train",
                ["dense", "--engine", args.engine, "--data", str(args.dataset),
                 "--out", str(args.runs), *_words("--train", args.train)])
    return train_cli.settings_from_args(ns)


def _check_plan(args: argparse.Namespace, dense) -> None:
    ns = _parse(lottery_cli.add_arguments, "bigticket lottery",
                ["plan", "--run", _LATER, *_words("--plan", args.plan)])
    grid = lottery_cli.PLAN_FLAGS.resolve(ns)
    if dense is None:
        return
    # The dense run saves init, final and its --rewind points: a grid asking for another fails.
    saved = ("init", "final", *dense.rewind)
    for flag, labels in (("--rewind", grid.rewind), ("--draw", grid.draw)):
        missing = [label for label in labels if label not in saved]
        if missing:
            raise _StageFlagError(f"{flag}: {', '.join(missing)} not saved by the training stage "
                                  f"(it saves {', '.join(saved)}; add them to --train's --rewind)")
    if grid.early_bird and not dense.early_bird:
        raise _StageFlagError("--early-bird: the training stage does not run with --early-bird")


def _check_lottery(args: argparse.Namespace) -> None:
    _parse(lottery_cli.add_arguments, "bigticket lottery",
           ["run", "--grid", _LATER, *_words("--lottery-args", args.lottery_args)])


def check_stage_flags(args: argparse.Namespace) -> None:
    """Parse and resolve every stage's flags as its job will; SubmitError lists every refusal,
    each naming the pipeline flag that carried it and the stage's own flag."""
    problems = []
    dense = None
    checks = [("--etl", "etl prepare", lambda: _check_etl(args))] if not args.skip_etl else []
    checks += [("--train", "train dense", lambda: _check_train(args)),
               ("--plan", "lottery plan", lambda: _check_plan(args, dense)),
               ("--lottery-args", "lottery run", lambda: _check_lottery(args))]
    for flag, command, check in checks:
        try:
            result = check()
        except (_StageFlagError, SubmitError, ValueError) as err:  # UsageError, SettingsError
            problems.append(f"{flag} (bigticket {command}): {err}")
            continue
        if flag == "--train":
            dense = result
    if problems:
        raise SubmitError("stage flags refused, nothing submitted:\n  " + "\n  ".join(problems))


def _sbatch_command(stage: Stage, common: list[str], per_stage: list[str], after: str | None) -> list[str]:
    dependency = [f"--dependency=afterok:{after}"] if after else []
    return ["sbatch", "--parsable", *dependency, *common, *per_stage, str(stage.script), *stage.args]


def submit_pipeline(args: argparse.Namespace, out=sys.stdout) -> dict[str, str]:
    """Submit (or, with --dry-run, print) every stage; returns stage name -> job id."""
    stages = pipeline_stages(args)
    check_stage_flags(args)
    common = [word for item in args.sbatch or [] for word in _words("--sbatch", item)]
    per_stage = {name: _words(f"--{name}-sbatch", getattr(args, f"{name}_sbatch"))
                 for name in ("etl", "train", "plan", "lottery", "report")}
    base_env = {"BIGTICKET_HOME": str(args.repo), "PYTHON": str(args.python)}
    if not args.dry_run:
        Path(args.state_dir or Path(args.runs) / ".pipeline").mkdir(parents=True, exist_ok=True)
    jobs: dict[str, str] = {}
    after = None
    for stage in stages:
        cmd = _sbatch_command(stage, common, per_stage[stage.name], after)
        env = {**base_env, **stage.env}
        if args.dry_run:
            prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            print(f"{prefix} {shlex.join(cmd)}", file=out)
            job = f"<{stage.name}-job-id>"
        else:
            done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
            if done.returncode != 0:
                _cancel(jobs)
                raise SubmitError(f"sbatch of stage {stage.name} ({stage.script.name}) failed: "
                                  f"{done.stderr.strip()}" + (f"; cancelled {', '.join(jobs.values())}"
                                                              if jobs else ""))
            job = done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
            log.info("submitted %s as job %s%s", stage.name, job, f" (after {after})" if after else "")
            print(f"{stage.name} {job}", file=out)
        jobs[stage.name] = job
        after = job
    return jobs


def _cancel(jobs: dict[str, str]) -> None:
    """A half-submitted chain is useless: cancel what was submitted (only those job ids)."""
    if jobs:
        subprocess.run(["scancel", *jobs.values()], capture_output=True, text=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="slurm_command", required=True, metavar="COMMAND")
    p = sub.add_parser("submit-pipeline", help="submit etl -> train -> plan -> lottery -> report",
                       description=__doc__.splitlines()[0])
    remember_prog(p)
    a = p.add_argument
    a("--dataset", required=True, type=Path, help="dataset directory (written by the etl job)")
    a("--runs", required=True, type=Path, help="runs root of the training (--out of train dense)")
    a("--etl", metavar="ARGS", help="flags of `etl prepare` as one word: --etl=\"--source digits --shards 8\"")
    a("--skip-etl", action="store_true", help="the dataset exists: start with the training")
    a("--train", metavar="ARGS", help="flags of `train dense` (without --data/--out/--engine)")
    a("--engine", choices=sorted(TRAIN_SCRIPTS), default="elephas")
    a("--plan", metavar="ARGS", help="flags of `lottery plan` (without --run)")
    a("--lottery", choices=sorted(LOTTERY_SCRIPTS), default="mpi", help="grid launcher")
    a("--lottery-args", metavar="ARGS", help="flags of `lottery run` (without --grid)")
    a("--sbatch", action="append", metavar="ARGS",
      help="sbatch options for every stage, e.g. \"--account=proj --partition=gpu\" (repeatable)")
    for name in ("etl", "train", "plan", "lottery", "report"):
        a(f"--{name}-sbatch", metavar="ARGS", help=f"sbatch options for the {name} stage only")
    a("--state-dir", type=Path, help="where stages pass paths on (default RUNS/.pipeline)")
    a("--repo", type=Path, default=REPO, help="bigticket checkout holding slurm/ (default: this one)")
    a("--python", type=Path, default=Path(sys.executable), help="the jobs' interpreter")
    a("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")


def run(args: argparse.Namespace) -> int:
    try:
        submit_pipeline(args)
    except (SubmitError, FileNotFoundError) as err:
        return usage_error(args, err)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bigticket.slurm ...`, the same as `bigticket slurm ...`."""
    parser = argparse.ArgumentParser(prog="python -m bigticket.slurm")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
