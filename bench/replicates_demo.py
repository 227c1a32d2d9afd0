"""The demo's lottery grid with replicates and retraining modes: what the report's statistics say.

Every stage is a real `bigticket` process, as `bigticket demo` runs it (same ETL flags, the same
LeNet-300-100 dense run, the same grid: sparsities 0.5,0.8,0.9,0.95 x rewind 0ep,1ep x control
random_reinit), planned with --replicates 3 (issue 13), run under mpiexec, then reported. With
--modes it also plans weights,lr,finetune on the same masks (rewind 0ep; a second grid). Prints the
report's paired-comparison and retraining-mode tables and writes bench/results/replicates_demo.json.

Usage: .venv/bin/python bench/replicates_demo.py [--replicates 3] [--modes] [--work DIR] [--ranks 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import write_json  # noqa: E402
from common.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.replicates_demo")
RESULTS = REPO / "bench" / "results" / "replicates_demo.json"


def _run(cmd: list[str]) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    log.info("%s: %.1fs", " ".join(cmd[2:5]), time.perf_counter() - t0)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    return proc.stdout.strip().splitlines()[-1]


def _bigticket(*args: str) -> str:
    return _run([sys.executable, "-m", "bigticket", *args])


def _grid(lenet: str, ranks: int, *plan_flags: str) -> tuple[str, float]:
    grid = _bigticket("lottery", "plan", "--run", lenet, *plan_flags)
    mpiexec = Path(sys.executable).with_name("mpiexec")
    t0 = time.perf_counter()
    _run([str(mpiexec if mpiexec.exists() else shutil.which("mpiexec")), "-n", str(ranks),
          sys.executable, "-m", "mpi4py", "-m", "lottery", "run", "--grid", grid])
    seconds = time.perf_counter() - t0
    _bigticket("report", grid)
    return grid, seconds


def _section(report: str, title: str) -> str:
    """The Markdown table under `## title` in report.md."""
    text = report.split(f"## {title}", 1)[-1] if f"## {title}" in report else ""
    return "\n".join(ln for ln in text.split("\n## ", 1)[0].splitlines() if ln.startswith("|"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--modes", action="store_true", help="also compare weights, lr, finetune")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--work", type=Path, help="directory for the data and runs (default: temp)")
    args = parser.parse_args()
    setup_logging()
    work = args.work or Path(tempfile.mkdtemp(prefix="replicates-demo-"))
    data, runs = work / "data" / "digits", work / "runs"
    _bigticket("etl", "prepare", "--source", "digits", "--out", str(data), "--resize", "fixed:32",
               "--format", "both", "--shards", "4", "--validation-shards", "2")
    lenet = _bigticket("train", "dense", "--data", str(data), "--model", "lenet_300_100",
                       "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--augment", "none",
                       "--engine", "local", "--epochs", "10", "--rewind", "0ep,1ep", "--out", str(runs))
    out: dict = {"replicates": args.replicates, "ranks": args.ranks, "work": str(work)}
    grid, seconds = _grid(lenet, args.ranks, "--sparsities", "0.5,0.8,0.9,0.95", "--rewind", "0ep,1ep",
                          "--controls", "random_reinit", "--replicates", str(args.replicates))
    report = (Path(grid) / "report.md").read_text()
    out["demo_grid"] = {"grid": grid, "seconds": round(seconds, 1),
                        "accuracy": _section(report, "Accuracy after retraining (one-shot masks)"),
                        "paired": _section(report, "Tickets vs controls, paired over replicates")}
    print(out["demo_grid"]["accuracy"], "\n")
    print(out["demo_grid"]["paired"], "\n")
    if args.modes:
        grid, seconds = _grid(lenet, args.ranks, "--sparsities", "0.5,0.8,0.9,0.95", "--rewind", "0ep",
                              "--replicates", str(args.replicates),
                              "--retrain-modes", "weights,lr,finetune")
        report = (Path(grid) / "report.md").read_text()
        out["modes_grid"] = {"grid": grid, "seconds": round(seconds, 1),
                             "modes": _section(report, "Retraining modes on the same masks")}
        print(out["modes_grid"]["modes"])
    write_json(RESULTS, out)
    log.info("wrote %s", RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
