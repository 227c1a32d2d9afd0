"""`bigticket demo`: the whole pipeline on the embedded digits dataset, stage by stage.

Each stage runs as its own `bigticket` command (the grid under `mpiexec`), exactly as a user would run
it, so the demo exercises the real command lines and the on-disk contracts between stages. Every
stage skips finished work, so a second `make demo` only prints the results again.

`--early-bird` swaps the demo's lottery part (LeNet-300-100 and its unstructured grid) for an
Early-Bird search: a small ResNet-20 trained with the `early-bird-resnet20` preset (bn_l1, the
detector, stopping at the ticket), channel masks drawn at an early checkpoint and at the ticket,
each compacted and retrained by the grid under mpiexec, and the report. It replaces rather than
follows the lottery part so the whole demo stays within its ~8 minute budget on 2 cores.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common.atomic import read_json
from common.paths import DenseRunPaths

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output", help="directory for every demo output")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks for the lottery grid")
    parser.add_argument("--dense-epochs", type=int, default=15,
                        help="epochs of the Elephas MobileNetV2 run")
    parser.add_argument("--early-bird", action="store_true",
                        help="run an Early-Bird search (ResNet-20, BN channel pruning, compaction) "
                             "instead of the LeNet-300-100 lottery grid")
    parser.add_argument("--early-bird-epochs", type=int, default=12,
                        help="dense epochs of the Early-Bird run if no ticket stops it sooner")


def _bigticket(*args: str) -> list[str]:
    return [sys.executable, "-m", "bigticket", *args]


def _mpiexec() -> str:
    """The mpich wheel's launcher, installed beside this interpreter."""
    found = Path(sys.executable).with_name("mpiexec")
    return str(found) if found.exists() else (shutil.which("mpiexec") or "mpiexec")


def _step(title: str, cmd: list[str]) -> str:
    """Run one stage, streaming its output; return its stdout (the path it printed last)."""
    log.info("== %s", title)
    log.info("$ %s", " ".join(cmd))
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"demo stage '{title}' failed (exit {proc.returncode}): {' '.join(cmd)}")
    log.info("   %s done in %.0f s", title, time.monotonic() - started)
    return proc.stdout


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SystemExit("a demo stage printed no output path")
    return lines[-1]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    data = out / "data" / "digits"
    runs = out / "runs"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    _step("ETL: digits -> TFRecord + Parquet shards",
          _bigticket("etl", "prepare", "--source", "digits", "--out", str(data),
                     "--resize", "fixed:32", "--format", "both", "--shards", "4",
                     "--validation-shards", "2"))
    _step("ETL: verify every shard", _bigticket("etl", "verify", str(data)))
    mobilenet = _last_line(_step(
        "dense: MobileNetV2 data-parallel with Elephas on local Spark",
        # Digits are tiny and centred: no crop/flip augmentation; Adam and a faster-moving
        # BatchNorm (Keras' MobileNetV2 uses 0.999) converge within the demo's budget.
        _bigticket("train", "dense", "--data", str(data), "--model", "mobilenet_v2",
                   "--model-option", "alpha=0.35", "--model-option", "bn_momentum=0.9",
                   "--optimizer", "adam", "--lr", "0.003", "--batch-size", "32",
                   "--augment", "none", "--engine", "elephas", "--workers", "2",
                   "--epochs", str(args.dense_epochs), "--rewind", "0ep,1ep,2ep",
                   "--out", str(runs), "--master", "local[2]")))
    if args.early_bird:
        _early_bird_search(args, data, runs, mobilenet)
        return 0
    lenet = _last_line(_step(
        "dense: LeNet-300-100 (the lottery-ticket paper's network) with the local engine",
        _bigticket("train", "dense", "--data", str(data), "--model", "lenet_300_100",
                   "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--augment", "none",
                   "--engine", "local", "--epochs", "10", "--rewind", "0ep,1ep",
                   "--out", str(runs))))
    grid = _last_line(_step(
        "lottery: plan masks x rewind points",
        _bigticket("lottery", "plan", "--run", lenet, "--sparsities", "0.5,0.8,0.9,0.95",
                   "--rewind", "0ep,1ep", "--controls", "random_reinit")))
    _run_grid(args, grid)
    print(f"\nDemo complete.\n  dataset:        {data}\n  MobileNetV2:    {mobilenet}\n"
          f"  LeNet-300-100:  {lenet}\n  lottery grid:   {grid}")
    return 0


def _run_grid(args: argparse.Namespace, grid: str) -> None:
    _step(f"lottery: run the grid over {args.ranks} MPI ranks",
          [_mpiexec(), "-n", str(args.ranks), sys.executable, "-m", "mpi4py", "-m", "lottery",
           "run", "--grid", grid])
    _step("report", _bigticket("report", grid))


def _early_bird_search(args: argparse.Namespace, data: Path, runs: Path, mobilenet: str) -> None:
    epochs = args.early_bird_epochs
    if epochs < 4:
        raise SystemExit("--early-bird-epochs must be >= 4")
    # The paper's recipe (preset) shrunk to digits: width 4, a short step schedule, a window of
    # 3 masks; 2ep is the early draw point the ticket is compared with.
    bird = _last_line(_step(
        "dense: ResNet-20 with bn_l1 and the Early-Bird detector, stopping at the ticket",
        _bigticket("train", "dense", "--preset", "early-bird-resnet20", "--data", str(data),
                   "--model-option", "width=4", "--model-option", "bn_momentum=0.9",
                   "--epochs", str(epochs),
                   "--lr-decay-epochs", f"{epochs // 2},{3 * epochs // 4}", "--rewind", "2ep",
                   "--augment", "crop", "--batch-size", "64", "--early-bird-window", "3",
                   "--stop-at-early-bird", "--engine", "local", "--out", str(runs))))
    record = read_json(DenseRunPaths(Path(bird)).early_bird)
    drawn = record.get("drawn_epoch")
    plan = ["lottery", "plan", "--run", bird, "--channel-ratios", "0.3,0.5", "--criterion", "bn",
            "--draw", "2ep", "--epochs", "3"]
    if drawn is None:
        log.warning("no Early-Bird ticket within %d epochs: drawing channel masks at 2ep only",
                    epochs)
    else:
        log.info("Early-Bird ticket drawn at epoch %d of %d", drawn, epochs)
        plan.append("--early-bird")
    grid = _last_line(_step("lottery: plan BN channel masks (structured, compacted)",
                            _bigticket(*plan)))
    _run_grid(args, grid)
    print(f"\nDemo complete (Early-Bird).\n  dataset:        {data}\n  MobileNetV2:    {mobilenet}\n"
          f"  ResNet-20:      {bird}  (ticket drawn at epoch {drawn})\n  structured grid: {grid}")
