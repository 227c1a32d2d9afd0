"""Planning robustness work: every finished network of a lottery grid x a list of epsilons, as tasks
of kind "robustness" (lottery.points.robustness) in a robustness grid the scheduler runs.

    bigticket lottery robustness --grid G --eps 0,0.02,0.05,0.1,0.2 --attack pgd --steps 10
    bigticket lottery run --grid G/robustness-<hash>      # or mpiexec / a job array, as for training

The robustness grid is `<G>/robustness-<hash>/`, a grid directory like any other (settings.json with
its task list, results/, claims/), so `lottery run`, `lottery status` and the sbatch scripts work on
it unchanged. Its name hashes the attack (attack, steps, step size, random start, restarts, seed)
and the evaluation batch size, not the epsilons: one task per (network, epsilon), with id
`<point task id>--eps<epsilon>` (`dense--eps0.1` for the dense model). Planning is idempotent and
additive: planning again after more points finished, or with more epsilons, adds only the new
tasks, and the scheduler then runs only those (results are never recomputed). Points are planned
once they have a result and a saved network (lottery.points.point_weights); points trained before
networks were kept are skipped with a warning naming how many.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from common.atomic import read_json
from common.paths import DenseRunPaths, GridPaths
from common.settings import SCHEMA_VERSION, SettingsError
from lottery.grid.plan import done_ids, load_plan, write_plan
from lottery.points.point_weights import has_point_weights
from lottery.points.robustness import DENSE_TARGET
from lottery.points.task import Task
from train.attacks import ATTACKS, AttackConfig, parse_epsilons

log = logging.getLogger(__name__)

ROBUSTNESS_PREFIX = "robustness-"


def eps_tag(epsilon: float) -> str:
    """0.1 -> 'eps0.1', 8/255 -> 'eps0.031373' (6 decimals, as parse_epsilons rounds)."""
    return "eps" + f"{epsilon:.6f}".rstrip("0").rstrip(".")


def robustness_task_id(target: str, epsilon: float) -> str:
    return f"{target}--{eps_tag(epsilon)}"


def attack_identity(config: AttackConfig, batch_size: int | None) -> dict[str, Any]:
    """The robustness grid's settings: the attack without its epsilon, and the batch size."""
    attack = {"attack": config.attack, "steps": config.resolved_steps,
              "step_size": config.step_size if config.attack == "pgd" else None,
              "random_start": config.uses_random_start,
              "restarts": config.restarts if config.uses_random_start else 1, "seed": config.seed}
    return {"kind": "robustness", "attack": attack, "batch_size": batch_size}


def robustness_grid(grid_dir: str | Path, config: AttackConfig, batch_size: int | None) -> GridPaths:
    identity = attack_identity(config, batch_size)
    blob = json.dumps({"schema_version": SCHEMA_VERSION, **identity}, sort_keys=True).encode()
    return GridPaths(Path(grid_dir) / f"{ROBUSTNESS_PREFIX}{hashlib.sha256(blob).hexdigest()[:8]}")


def finished_targets(grid: GridPaths) -> tuple[list[str], list[str]]:
    """(point task ids with a result and a saved network, in plan order; those without network)."""
    done = done_ids(grid)
    ready, missing = [], []
    for task in load_plan(grid.root)["tasks"]:
        if task.task_id in done:
            (ready if has_point_weights(grid.root, task.task_id) else missing).append(task.task_id)
    return ready, missing


def plan_robustness(grid_dir: str | Path, config: AttackConfig, epsilons: Sequence[float], *,
                    batch_size: int | None = None, dense: bool = True) -> GridPaths:
    """Write (or extend) the robustness grid of `config` under the lottery grid `grid_dir`; returns
    its paths. `epsilons` on the [0, 1] image scale; `dense`: also evaluate the dense model."""
    grid = GridPaths(Path(grid_dir))
    load_plan(grid.root)  # SettingsError naming the file when it is not a planned grid
    if grid.root.name.startswith(ROBUSTNESS_PREFIX):
        raise SettingsError(f"--grid {grid.root}: a robustness grid; give the lottery grid it "
                            f"belongs to")
    epsilons = parse_epsilons(list(epsilons))
    targets, missing = finished_targets(grid)
    if missing:
        log.warning("%d finished point(s) have no saved network (trained before points kept "
                    "theirs) and are skipped, e.g. %s", len(missing), missing[0])
    if dense:
        run = DenseRunPaths(grid.root.parent)
        if not run.model.is_file():
            raise FileNotFoundError(f"{run.model}: the dense run has no final model")
        targets = [DENSE_TARGET, *targets]
    out = robustness_grid(grid.root, config, batch_size)
    identity = attack_identity(config, batch_size)
    existing: list[Task] = []
    if out.settings.is_file():
        record = load_plan(out.root)
        if record["settings"] != identity:
            raise SettingsError(f"{out.settings}: holds another attack than this (hash collision?)")
        existing = record["tasks"]
    known = {t.task_id for t in existing}
    cost = float(config.resolved_steps * (config.restarts if config.uses_random_start else 1) + 1)
    new = []
    for target in targets:
        for eps in epsilons:
            task_id = robustness_task_id(target, eps)
            if task_id not in known:
                new.append(Task(task_id=task_id, kind="robustness", cost=cost if eps > 0 else 1.0,
                                params={"target": target, "epsilon": eps}))
    if new or not out.settings.is_file():
        out.root.mkdir(parents=True, exist_ok=True)
        tasks = existing + new
        all_eps = sorted({float(t.params["epsilon"]) for t in tasks} | set(epsilons))
        write_plan(out, identity, tasks, extra={"lottery_grid": grid.root.name,
                                                "epsilons": all_eps})
    log.info("robustness grid %s: %d task(s), %d new (%d network(s) x %d epsilon(s))", out.root,
             len(existing) + len(new), len(new), len(targets), len(epsilons))
    return out


def robustness_grids(grid_dir: str | Path) -> list[GridPaths]:
    """The robustness grids planned under a lottery grid."""
    root = Path(grid_dir)
    return [GridPaths(p) for p in sorted(root.glob(f"{ROBUSTNESS_PREFIX}*")) if (p / "settings.json").is_file()]


def load_robustness_results(grid_dir: str | Path) -> list[dict[str, Any]]:
    """Every robustness result under a lottery grid, one row per (network, epsilon, attack)."""
    rows = []
    for sub in robustness_grids(grid_dir):
        if not sub.results.is_dir():
            continue
        for path in sorted(sub.results.glob("*.json")):
            if path.name.startswith("."):
                continue
            record = read_json(path).get("result", {})
            attack = record.get("attack", {})
            rows.append({**record.get("point", {}), "target": record.get("target"),
                         "epsilon": record.get("epsilon"), "attack": attack.get("attack"),
                         "steps": attack.get("steps"), "restarts": attack.get("restarts"),
                         "robust_accuracy": record.get("robust_accuracy"),
                         "robust_loss": record.get("robust_loss"), "robustness_grid": sub.root.name})
    return rows


# -- CLI: `bigticket lottery robustness` ---------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, type=Path, help="planned lottery grid directory")
    parser.add_argument("--eps", default="0,0.02,0.05,0.1,0.2",
                        help="epsilons on the [0, 1] image scale, e.g. 0,0.05,8/255 "
                             "(default: %(default)s)")
    parser.add_argument("--attack", choices=ATTACKS, default="pgd", help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (default: %(default)s)")
    parser.add_argument("--step-size", type=float,
                        help="PGD step on the [0, 1] scale (default: 2.5 * eps / steps)")
    parser.add_argument("--restarts", type=int, default=1,
                        help="PGD random restarts, worst case kept per example (default: 1)")
    parser.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=True,
                        help="PGD starts at a random point of the eps-ball (default: on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random starts")
    parser.add_argument("--batch-size", type=int,
                        help="evaluation batch (default: the dense run's batch size)")
    parser.add_argument("--no-dense", action="store_true",
                        help="do not evaluate the dense model")


def run(args) -> int:
    """Plan (or extend) the robustness grid; prints its directory for `lottery run --grid`."""
    try:
        config = AttackConfig(attack=args.attack, epsilon=0.0, steps=args.steps,
                              step_size=args.step_size, random_start=args.random_start,
                              restarts=args.restarts, seed=args.seed)
    except ValueError as err:
        field = str(err).split(":", 1)[0].replace("_", "-")
        raise SettingsError(f"--{field}: {str(err).split(':', 1)[-1].strip()}") from None
    if args.batch_size is not None and args.batch_size < 1:
        raise SettingsError(f"--batch-size: must be >= 1, got {args.batch_size}")
    out = plan_robustness(args.grid, config, parse_epsilons(args.eps),
                          batch_size=args.batch_size, dense=not args.no_dense)
    print(out.root)
    return 0
