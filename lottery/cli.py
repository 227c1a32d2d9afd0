"""`bigticket lottery {plan,run,stats,status}` (also `python -m lottery ...`, e.g. under mpiexec).

TensorFlow is imported only by the sub-commands that need it, and by `run` only after the GPU of
this rank was pinned.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_PLAN_FLAGS = {  # flag -> GridSettings field
    "sparsities": "sparsities", "quantiles": "quantiles", "scope": "scope", "rewind": "rewind",
    "controls": "controls", "imp_rounds": "imp_rounds", "imp_rate": "imp_rate",
    "exclude": "exclude", "epochs": "epochs", "seed": "seed", "channel_ratios": "channel_ratios",
    "criterion": "criterion", "channel_scope": "channel_scope", "draw": "draw",
    "early_bird": "early_bird", "channel_round_to": "channel_round_to",
}


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="write a grid's settings, weight statistics, masks and tasks")
    plan.add_argument("--run", required=True, type=Path, help="finished dense run directory")
    plan.add_argument("--config", type=Path, help="JSON/YAML file of grid settings (flags override)")
    plan.add_argument("--preset", metavar="NAME",
                      help="start from a named preset's grid settings (common.presets, e.g. "
                           "early-bird-resnet20); --config and flags override it")
    thresholds = plan.add_mutually_exclusive_group()
    thresholds.add_argument("--sparsities", help="target sparsities, e.g. 0.5,0.7,0.9")
    thresholds.add_argument("--quantiles", help="magnitude quantiles used as thresholds")
    plan.add_argument("--scope", choices=("global", "layer"))
    plan.add_argument("--rewind", help="saved points of the dense run, e.g. init,1ep,final")
    plan.add_argument("--controls", help="random_reinit,random_mask")
    plan.add_argument("--imp-rounds", type=int)
    plan.add_argument("--imp-rate", type=float)
    plan.add_argument("--exclude", help="weight-name patterns never pruned (fnmatch), comma-separated")
    plan.add_argument("--epochs", type=int, help="retraining epochs (default: the dense run's)")
    plan.add_argument("--seed", type=int)
    structured = plan.add_argument_group("structured pruning (channels removed, network compacted)")
    structured.add_argument("--channel-ratios", dest="channel_ratios",
                            help="fractions of the channels to remove, e.g. 0.3,0.5")
    structured.add_argument("--criterion", choices=("l1", "l2", "fpgm", "bn"),
                            help="channel importance (default bn: BatchNorm scale)")
    structured.add_argument("--channel-scope", dest="channel_scope", choices=("global", "layer"),
                            help="one threshold over all channels or per layer (default: global "
                                 "for bn, layer otherwise)")
    structured.add_argument("--channel-round-to", dest="channel_round_to", type=int,
                            help="keep a multiple of N channels per layer (e.g. 16; default 1)")
    structured.add_argument("--draw", help="dense-run checkpoints to draw channel masks at, "
                                           "e.g. 10ep,30ep")
    structured.add_argument("--early-bird", dest="early_bird", action=argparse.BooleanOptionalAction,
                            help="also draw at the dense run's Early-Bird ticket (--no-early-bird "
                                 "turns a preset's off)")

    run = sub.add_parser("run", help="run the points of a grid that have no result yet")
    run.add_argument("--grid", required=True, type=Path)
    run.add_argument("--array-index", type=int, help="this SLURM job-array element (0-based)")
    run.add_argument("--array-count", type=int, help="number of job-array elements")
    run.add_argument("--executor", default="lottery.points.oneshot:train_point",
                     help="MODULE:FUNCTION(run_dir, grid_dir, task, settings) -> dict running "
                          "one point (default: the real retraining)")
    run.add_argument("--strategy", choices=("dynamic", "static"), default="dynamic",
                     help="MPI hand-out: dynamic (default) or static striding (benchmarks only)")
    run.add_argument("--coordinator-only", action="store_true",
                     help="MPI rank 0 only hands out points instead of also running them")
    run.add_argument("--heartbeat", type=_positive, help="seconds between liveness signals")
    run.add_argument("--stale-after", type=_positive, default=120.0,
                     help="a claim without heartbeat for this long belongs to a dead worker")
    run.add_argument("--silence-timeout", type=_positive, default=30.0,
                     help="MPI: abort when a busy rank (or rank 0) is silent this long")

    from lottery.vae import cli as vae_cli

    vae = sub.add_parser("vae-study", help="VAE neuron-pruning study: l1/l2/fpgm x ratios, loss "
                                           "split before/after pruning and fine-tuning")
    vae_cli.add_arguments(vae)

    stats = sub.add_parser("stats", help="magnitude quantiles of a dense run's final weights")
    stats.add_argument("--run", required=True, type=Path)
    stats.add_argument("--json", action="store_true", help="print JSON instead of the table")

    status = sub.add_parser("status", help="progress of a grid: points done/total, claims, ETA")
    status.add_argument("--grid", required=True, type=Path)
    status.add_argument("--stale-after", type=_positive, default=120.0)
    status.add_argument("--json", action="store_true")


def _plan(args) -> int:
    from common.settings import load_settings_file, make_settings
    from lottery.grid.plan import plan
    from lottery.grid.settings import GridSettings

    values = {}
    if args.preset:
        from common.presets import preset

        values.update(preset(args.preset, "grid"))
    if args.config:
        values.update(load_settings_file(args.config))
    for flag, field in _PLAN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            values[field] = value
    if "sparsities" in values and "quantiles" in values:
        # a flag of one kind replaces the config file's other kind
        values.pop("quantiles" if args.sparsities is not None else "sparsities")
    settings = make_settings(GridSettings, values)
    grid = plan(args.run, settings)
    from lottery.prune.stats import format_stats_table
    from common.atomic import read_json

    log.info("weight statistics of the final weights:\n%s", format_stats_table(read_json(grid.stats)))
    print(grid.root)
    return 0


def _run(args) -> int:
    from lottery.grid.scheduler import GridPreempted, run_grid

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
    from lottery.grid.plan import load_final_weights, read_run
    from lottery.prune.stats import format_stats_table, weight_stats

    stats = weight_stats(load_final_weights(read_run(args.run).paths))
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_stats_table(stats))
    return 0


def _status(args) -> int:
    from lottery.report.build import format_progress, grid_progress

    progress = grid_progress(args.grid, stale_after=args.stale_after)
    print(json.dumps(progress, indent=2, sort_keys=True) if args.json else format_progress(progress))
    return 0


def run(args) -> int:
    from common.settings import SettingsError
    from lottery.grid.scheduler import WorldSizeError

    try:
        if args.command == "vae-study":
            from lottery.vae import cli as vae_cli

            return vae_cli.run(args)
        return {"plan": _plan, "run": _run, "stats": _stats, "status": _status}[args.command](args)
    except (SettingsError, FileNotFoundError, WorldSizeError, ValueError) as err:
        log.error("%s", err)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`python -m lottery ...`: the same commands as `bigticket lottery ...`."""
    from common.cluster import process_place
    from common.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m lottery", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    place = process_place()
    setup_logging(rank=place.rank if place.size > 1 else None)
    return run(args)
