"""Scaling of the lottery-grid scheduler: makespan vs ideal on 1, 2 and 4 MPI ranks (real mpiexec).

The points sleep for uneven, known durations (lottery.grid.simulate), so the numbers measure
scheduling, not training. The plan orders points by ESTIMATED cost, and the estimate is off by up
to +-40% as real estimates are; dynamic hand-out and static striding run the same grid.

    .venv/bin/python bench/grid_scaling.py [--points 24] [--mean 0.5] [--ranks 1,2,4]

Reports per run: makespan (first start to last finish, over the result files), ideal = sum of
point times / ranks, parallel efficiency = ideal / makespan (and against the longest-first schedule
of the measured point times on the working ranks, "vs LPT"), and the scheduler overhead per point
(the gap on a rank between finishing one point and starting the next). Targets: efficiency >= 0.9
at 4 ranks (dynamic), overhead < 0.2 s per point. Prints a table, writes
bench/results/grid_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import read_json, write_json  # noqa: E402
from lottery.grid.plan import load_tasks  # noqa: E402
from lottery.grid.simulate import EXECUTOR, lpt_makespan, make_sleep_grid  # noqa: E402

OUT = REPO / "bench" / "results" / "grid_scaling.json"


def durations_and_estimates(points: int, mean: float, seed: int) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    d = np.clip(rng.lognormal(np.log(mean) - 0.3, 0.8, points), 0.05, 4 * mean)
    est = d * rng.uniform(0.6, 1.4, points)   # the planner's estimate is only roughly right
    return [round(float(x), 3) for x in d], [round(float(x), 3) for x in est]


def run_once(base: Path, durations, estimates, ranks: int, strategy: str, coordinator_only: bool) -> dict:
    root = base / f"{strategy}-{ranks}-{'coord' if coordinator_only else 'work'}"
    # The plan orders by the estimates, longest estimated first (what lottery.grid.plan does).
    grid = make_sleep_grid(root, durations, costs=estimates)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "SLURM_"))}
    env["PYTHONPATH"] = str(REPO)
    env["BIGTICKET_LOG_LEVEL"] = "WARNING"
    cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), sys.executable, "-m",
           "mpi4py", "-m", "lottery", "run", "--grid", str(grid.root),
           "--executor", EXECUTOR, "--strategy", strategy]
    if coordinator_only:
        cmd.append("--coordinator-only")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    results = [read_json(grid.result(t.task_id)) for t in load_tasks(grid.root)]
    start = min(r["started_at"] for r in results)
    end = max(r["finished_at"] for r in results)
    makespan = end - start
    work = sum(r["wall_time"] for r in results)
    workers = ranks - 1 if coordinator_only and ranks > 1 else ranks
    gaps = []
    by_rank: dict[int, list] = {}
    for r in results:
        by_rank.setdefault(r["worker"]["rank"], []).append(r)
    for rs in by_rank.values():
        rs.sort(key=lambda r: r["started_at"])
        gaps += [b["started_at"] - a["finished_at"] for a, b in zip(rs, rs[1:])]
    ideal = work / ranks
    # The longest-first schedule of the measured point times: what a perfect dynamic scheduler
    # reaches with exact estimates (bench/cluster_sim.py measures against it at 80 ranks).
    lpt = lpt_makespan([r["wall_time"] for r in results], workers)
    return {"ranks": ranks, "strategy": strategy, "rank0": "coordinates only" if coordinator_only else "works",
            "working_ranks": workers, "points": len(results), "work_s": round(work, 3),
            "ideal_s": round(ideal, 3), "makespan_s": round(makespan, 3),
            "efficiency": round(ideal / makespan, 3), "lpt_s": round(lpt, 3),
            "efficiency_vs_lpt": round(lpt / makespan, 3), "job_wall_s": round(wall, 3),
            "overhead_per_point_s": round(float(np.mean(gaps)) if gaps else 0.0, 4),
            "max_gap_s": round(float(np.max(gaps)) if gaps else 0.0, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=24)
    parser.add_argument("--mean", type=float, default=0.5, help="mean point duration (s)")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    durations, estimates = durations_and_estimates(args.points, args.mean, args.seed)
    base = Path(tempfile.mkdtemp(prefix="grid-scaling-"))
    rows = []
    try:
        for ranks in [int(r) for r in args.ranks.split(",")]:
            for strategy in ("dynamic", "static"):
                rows.append(run_once(base, durations, estimates, ranks, strategy, False))
            if ranks > 1:
                rows.append(run_once(base, durations, estimates, ranks, "dynamic", True))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    header = (f"{'ranks':>5} {'strategy':>8} {'rank 0':>17} {'ideal s':>8} {'makespan s':>10} "
              f"{'efficiency':>10} {'vs LPT':>6} {'overhead/pt s':>13} {'job wall s':>10}")
    print(f"{args.points} points, {sum(durations):.2f} s of work, durations {min(durations):.2f}.."
          f"{max(durations):.2f} s, estimates off by up to 40%")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['ranks']:>5} {r['strategy']:>8} {r['rank0']:>17} {r['ideal_s']:>8.2f} "
              f"{r['makespan_s']:>10.2f} {r['efficiency']:>10.3f} {r['efficiency_vs_lpt']:>6.3f} "
              f"{r['overhead_per_point_s']:>13.4f} "
              f"{r['job_wall_s']:>10.2f}")
    best4 = [r for r in rows if r["ranks"] == 4 and r["strategy"] == "dynamic" and r["rank0"] == "works"]
    targets = {}
    if best4:
        targets = {"efficiency_at_4_ranks_dynamic": best4[0]["efficiency"],
                   "efficiency_target": 0.9, "efficiency_met": best4[0]["efficiency"] >= 0.9}
    # The target is for the default configuration (dynamic, rank 0 also works).
    overheads = [r["overhead_per_point_s"] for r in rows
                 if r["strategy"] == "dynamic" and r["rank0"] == "works"]
    targets.update({"max_overhead_per_point_s": max(overheads), "overhead_target_s": 0.2,
                    "overhead_met": max(overheads) < 0.2})
    print(json.dumps(targets))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"benchmark": "grid_scaling", "points": args.points, "durations": durations,
                          "estimates": estimates, "rows": rows, "targets": targets,
                          "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                   "platform": platform.platform()},
                          "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
