"""`bigticket lottery {plan,run,stats,status,vae-study}` (also `python -m lottery ...`, e.g. under
mpiexec).

The flags of `plan` are GridSettings' fields (common.cli), after `--preset` and `--config`.
TensorFlow is imported only by the sub-commands that need it, and by `run` only after the GPU of
this rank was pinned.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from common.atomic import read_json
from common.cli import SettingsFlags, remember_prog, usage_error
from common.cluster import process_place
from common.logs import setup_logging
from common.native_logs import quiet_tensorflow
from common.settings import SettingsError, make_settings, settings_to_dict
from lottery.grid import robustness_plan
from lottery.grid.claims import DEFAULT_HEARTBEAT, DEFAULT_STALE_AFTER
from lottery.grid.coordinator import DEFAULT_SILENCE_TIMEOUT, MPI_HEARTBEAT
from lottery.grid.plan import load_final_weights, plan, read_run
from lottery.grid.replicate_runs import replicate_run_names
from lottery.grid.scheduler import DEFAULT_EXECUTOR, GridPreempted, WorldSizeError, run_grid
from lottery.grid.settings import GridSettings
from lottery.prune.stats import format_stats_table, weight_stats
from lottery.report.progress import format_progress, grid_progress
from lottery.vae import cli as vae_cli

log = logging.getLogger(__name__)

PLAN_FLAGS = SettingsFlags(
    GridSettings, preset_stage="grid", exclusive=[("sparsities", "quantiles")],
    groups={"structured pruning (channels removed, network compacted)": (
        "channel_ratios", "criterion", "channel_scope", "channel_round_to", "draw", "early_bird"),
        "replicates and retraining modes": (
            "replicates", "replicate_runs", "retrain_modes", "finetune_lr")})


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan_parser = sub.add_parser(
        "plan", help="write a grid's settings, weight statistics, masks and tasks")
    plan_parser.add_argument("--run", required=True, type=Path, action="append",
                             help="finished dense run directory; give it again for replicate dense "
                                  "runs of the same configuration (other seeds, same --out): "
                                  "replicate r retrains the r-th run, the grid sits under the first")
    plan_parser.add_argument("--config", type=Path,
                             help="JSON/YAML file of grid settings (flags override)")
    plan_parser.add_argument("--preset", metavar="NAME",
                             help="start from a named preset's grid settings (common.presets, "
                                  "e.g. early-bird-resnet20); --config and flags override it")
    PLAN_FLAGS.add_arguments(plan_parser)

    run = sub.add_parser("run", help="run the points of a grid that have no result yet")
    remember_prog(run)
    run.add_argument("--grid", required=True, type=Path)
    run.add_argument("--array-index", type=int, help="this SLURM job-array element (0-based)")
    run.add_argument("--array-count", type=int, help="number of job-array elements")
    run.add_argument("--executor", default=DEFAULT_EXECUTOR,
                     help="MODULE:FUNCTION(run_dir, grid_dir, task, settings, stop) -> dict "
                          "running one point (default: %(default)s, the real retraining)")
    run.add_argument("--strategy", choices=("dynamic", "static"), default="dynamic",
                     help="MPI hand-out: dynamic (default) or static striding (benchmarks only)")
    run.add_argument("--coordinator-only", action="store_true",
                     help="MPI rank 0 only hands out points instead of also running them")
    run.add_argument("--heartbeat", type=_positive,
                     help=f"seconds between liveness signals (default: {MPI_HEARTBEAT:g} under "
                          f"MPI, else {DEFAULT_HEARTBEAT:g})")
    run.add_argument("--stale-after", type=_positive, default=DEFAULT_STALE_AFTER,
                     help="a claim without heartbeat for this long belongs to a dead worker "
                          "(default: %(default)g)")
    run.add_argument("--silence-timeout", type=_positive, default=DEFAULT_SILENCE_TIMEOUT,
                     help="MPI: abort when a busy rank (or rank 0) is silent this long "
                          "(default: %(default)g)")

    robustness_plan.add_arguments(sub.add_parser(
        "robustness", help="plan robustness tasks (finished points x epsilons) for `lottery run`"))

    vae = sub.add_parser("vae-study", help="VAE neuron-pruning study: l1/l2/fpgm x ratios, loss "
                                           "split before/after pruning and fine-tuning")
    vae_cli.add_arguments(vae)

    stats = sub.add_parser("stats", help="magnitude quantiles of a dense run's final weights")
    remember_prog(stats)
    stats.add_argument("--run", required=True, type=Path)
    stats.add_argument("--json", action="store_true", help="print JSON instead of the table")

    status = sub.add_parser("status", help="progress of a grid: points done/total, claims, ETA")
    remember_prog(status)
    status.add_argument("--grid", required=True, type=Path)
    status.add_argument("--stale-after", type=_positive, default=DEFAULT_STALE_AFTER,
                        help="a claim without heartbeat for this long counts as stale "
                             "(default: %(default)g)")
    status.add_argument("--json", action="store_true")


def _plan(args) -> int:
    settings = PLAN_FLAGS.resolve(args)
    first, *others = args.run
    if others:
        if settings.replicate_runs:
            raise SettingsError("--run: give replicate dense runs either as repeated --run or as "
                                "--replicate-runs, not both")
        # --replicates, if given, must agree (GridSettings names it otherwise)
        settings = make_settings(GridSettings, {**settings_to_dict(settings),
                                                "replicate_runs": replicate_run_names(first, others)})
    grid = plan(first, settings)
    log.info("weight statistics of the final weights:\n%s", format_stats_table(read_json(grid.stats)))
    print(grid.root)
    return 0


def _run(args) -> int:
    try:
        summary = run_grid(args.grid, executor=args.executor, array_index=args.array_index,
                           array_count=args.array_count, strategy=args.strategy,
                           heartbeat=args.heartbeat, stale_after=args.stale_after,
                           silence_timeout=args.silence_timeout,
                           rank0_works=not args.coordinator_only)
    except GridPreempted as stopped:  # re-raised: its exit status (75) asks SLURM to requeue
        done = stopped.summary
        print(f"stopped on request: {done.done_at_end}/{done.total} points done; running points "
              f"kept their last complete epoch for the next launch")
        raise
    if summary.rank == 0:
        print(f"{summary.done_at_end}/{summary.total} points done; this launch ran "
              f"{len(summary.executed)} on rank 0 ({summary.mode}, {summary.size} process(es))")
    return 0


def _stats(args) -> int:
    stats = weight_stats(load_final_weights(read_run(args.run).paths))
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_stats_table(stats))
    return 0


def _status(args) -> int:
    progress = grid_progress(args.grid, stale_after=args.stale_after)
    print(json.dumps(progress, indent=2, sort_keys=True) if args.json else format_progress(progress))
    return 0


def run(args) -> int:
    commands = {"plan": _plan, "run": _run, "stats": _stats, "status": _status,
                "vae-study": vae_cli.run,
                "robustness": robustness_plan.run}
    try:
        return commands[args.command](args)
    except (SettingsError, FileNotFoundError, WorldSizeError, ValueError) as err:
        return usage_error(args, err)


def main(argv: list[str] | None = None) -> int:
    """`python -m lottery ...`: the same commands as `bigticket lottery ...`."""
    parser = argparse.ArgumentParser(prog="python -m lottery", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    place = process_place()
    setup_logging(rank=place.rank if place.size > 1 else None)
    quiet_tensorflow()  # before `run` pins the GPU and imports TensorFlow
    return run(args)
