"""Early-Bird saving: dense epochs run until the Early-Bird ticket is drawn
vs the full schedule, and the wall time of both; prints a table, writes
bench/results/early_bird_saving.json.

Both runs are the `early-bird-resnet20` preset (SGD 0.1, step decay at 1/2 and 3/4 of the
schedule, bn_l1, the detector on) scaled down to digits: ResNet-20 of small width, `--epochs`
epochs. The first trains the full schedule (the detector only watches); the second stops at the
ticket (`--stop-at-early-bird`). Each is a real `bigticket train dense` process, timed from launch
to exit, so the wall times include start-up as a user sees it.

Usage: .venv/bin/python bench/early_bird_saving.py [--data DATASET_DIR] [--epochs 30] [--width 4]
Without --data, digits is prepared at 16x16 with `bigticket etl prepare --source digits`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import write_json  # noqa: E402
from common.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.early_bird_saving")
RESULTS = REPO / "bench" / "results" / "early_bird_saving.json"


def _bigticket(*args: str) -> tuple[str, float]:
    """Run one `bigticket` command; (its last output line, wall seconds)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bigticket", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bigticket {' '.join(args)} failed (exit {proc.returncode})")
    return proc.stdout.strip().splitlines()[-1], wall


def _outcome(run_dir: Path, wall: float) -> dict:
    from common.paths import DenseRunPaths
    from train.run_files import read_history

    run = DenseRunPaths(run_dir)
    history = read_history(run)
    bird = json.loads(run.early_bird.read_text())
    return {"run": str(run.root), "epochs_run": len(history), "wall_s": round(wall, 2),
            "train_s": round(sum(r.get("time_s", 0.0) for r in history), 2),
            "drawn_epoch": bird["drawn_epoch"], "stopped_early": bird["stopped_early"],
            "val_accuracy": history[-1].get("val_accuracy") if history else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset directory (default: digits at 16x16, prepared here)")
    parser.add_argument("--epochs", type=int, default=30, help="the full schedule")
    parser.add_argument("--width", type=int, default=4, help="ResNet-20 base width (paper: 16)")
    parser.add_argument("--bn-l1", type=float, default=1e-4, help="preset: 1e-4")
    parser.add_argument("--ratio", type=float, default=0.5, help="Early-Bird mask ratio")
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--work", help="directory for the dataset and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.epochs < 4:
        parser.error("--epochs must be >= 4 (the step schedule decays at 1/2 and 3/4)")

    with tempfile.TemporaryDirectory(prefix="bench-eb-") as tmp:
        work = Path(args.work or tmp)
        data = args.data
        if data is None:
            data, _ = _bigticket("etl", "prepare", "--source", "digits", "--out",
                                 str(work / "digits16"), "--resize", "fixed:16", "--format",
                                 "tfrecord", "--shards", "3", "--validation-shards", "2")
        e = args.epochs
        common = ["train", "dense", "--preset", "early-bird-resnet20", "--data", str(data),
                  "--out", str(work / "runs"), "--model-option", f"width={args.width}",
                  "--model-option", "bn_momentum=0.9",
                  "--epochs", str(e), "--lr-decay-epochs", f"{e // 2},{3 * e // 4}",
                  "--rewind", "", "--augment", "crop", "--batch-size", "64",
                  "--bn-l1", str(args.bn_l1), "--early-bird-ratio", str(args.ratio),
                  "--early-bird-window", str(args.window),
                  "--early-bird-threshold", str(args.threshold)]
        log.info("full schedule: %d epochs", e)
        full_dir, full_wall = _bigticket(*common, "--no-stop-at-early-bird")
        log.info("stopping at the Early-Bird ticket")
        bird_dir, bird_wall = _bigticket(*common, "--stop-at-early-bird")
        full, bird = _outcome(Path(full_dir), full_wall), _outcome(Path(bird_dir), bird_wall)

    result = {
        "dataset": "digits 16x16" if args.data is None else str(args.data),
        "model": f"resnet20 width {args.width}", "epochs": e, "bn_l1": args.bn_l1,
        "ratio": args.ratio, "window": args.window, "threshold": args.threshold,
        "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "full": full, "early_bird": bird,
        "epoch_saving": None if not bird["stopped_early"] else 1 - bird["epochs_run"] / e,
        "wall_saving": 1 - bird["wall_s"] / full["wall_s"],
    }
    write_json(RESULTS, result)
    print(f"{'run':<24}{'epochs':>8}{'drawn at':>10}{'wall s':>10}{'train s':>10}{'val acc':>9}")
    for name, r in (("full schedule", full), ("stop at Early-Bird", bird)):
        acc = "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.3f}"
        print(f"{name:<24}{r['epochs_run']:>8}{str(r['drawn_epoch']):>10}{r['wall_s']:>10.1f}"
              f"{r['train_s']:>10.1f}{acc:>9}")
    if result["epoch_saving"] is None:
        print(f"no Early-Bird ticket was drawn within {e} epochs: nothing saved")
    else:
        print(f"dense epochs saved: {result['epoch_saving']:.0%}, wall time saved: "
              f"{result['wall_saving']:.0%}")
    print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
