"""No silent chance-level run (issue 13, item 6): the new user's MobileNetV2 run on digits,
`bigticket train dense --data <digits> --model mobilenet_v2 --engine elephas --epochs 10
--workers 2` with every other default, under the former defaults and today's; prints a table,
writes bench/results/bn_recalibration.json.

Configurations (each a real `bigticket train dense` process on local[2] Spark):
- former:      BatchNorm momentum 0.99, no recalibration (what the command did before)
- momentum:    the momentum fitted to the run's length (auto), no recalibration
- default:     today's defaults: auto momentum and auto recalibration (on: 2 Elephas workers)
Figures: the final epoch's training accuracy (running mean over the epoch, as Keras reports it),
validation top-1 and top-5, the gap, the validation accuracy before recalibration, how many
epochs the history flags at chance, and the wall time.

Usage: nice .venv/bin/python bench/bn_recalibration.py [--data DIGITS_32] [--epochs 10]
Without --data, digits is prepared at 32x32 as the demo does (bigticket/demo.py).
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

log = logging.getLogger("bench.bn_recalibration")
RESULTS = REPO / "bench" / "results" / "bn_recalibration.json"
CONFIGS = {
    "former": ["--model-option", "bn_momentum=0.99", "--bn-recalibration", "off"],
    "momentum": ["--bn-recalibration", "off"],
    "default": [],
}


def _bigticket(*args: str) -> tuple[str, float]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bigticket", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bigticket {' '.join(args)} failed (exit {proc.returncode})")
    return proc.stdout.strip().splitlines()[-1], time.perf_counter() - t0


def _outcome(run_dir: Path, wall: float) -> dict:
    from common.paths import DenseRunPaths
    from train.run_files import read_history

    run = DenseRunPaths(run_dir)
    history = read_history(run)
    last = history[-1]
    record = json.loads(run.settings.read_text())
    return {"run": str(run.root), "wall_s": round(wall, 1), "bn_momentum": record.get("bn_momentum"),
            "accuracy": last.get("accuracy"), "val_accuracy": last.get("val_accuracy"),
            "val_top5_accuracy": last.get("val_top5_accuracy"),
            "gap": last.get("accuracy", 0.0) - last.get("val_accuracy", 0.0),
            "val_before_recalibration": last.get("val_accuracy_before_bn_recalibration"),
            "epochs_at_chance": int(sum(r.get("val_at_chance", 0.0) for r in history)),
            "val_accuracy_by_epoch": [round(r.get("val_accuracy", 0.0), 4) for r in history]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="digits at 32x32 (default: prepared here)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--work", help="directory for the dataset and runs (default: temporary)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="subset, comma-separated")
    args = parser.parse_args(argv)
    setup_logging()
    outcomes = {}
    with tempfile.TemporaryDirectory(prefix="bench-bn-") as tmp:
        work = Path(args.work or tmp)
        data = args.data
        if data is None:
            data, _ = _bigticket("etl", "prepare", "--source", "digits", "--out",
                                 str(work / "digits"), "--resize", "fixed:32", "--format", "both",
                                 "--shards", "4", "--validation-shards", "2")
        for name in args.configs.split(","):
            log.info("configuration %s", name)
            run_dir, wall = _bigticket(
                "train", "dense", "--data", str(data), "--model", "mobilenet_v2", "--engine",
                "elephas", "--epochs", str(args.epochs), "--workers", "2", "--master", "local[2]",
                "--out", str(work / f"runs-{name}"), *CONFIGS[name])
            outcomes[name] = _outcome(Path(run_dir), wall)
    result = {"dataset": "digits 32x32" if args.data is None else str(args.data),
              "command": "train dense --model mobilenet_v2 --engine elephas --workers 2",
              "epochs": args.epochs, "cpu_count": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0], "runs": outcomes}
    write_json(RESULTS, result)
    print(f"{'configuration':<14}{'momentum':>9}{'train':>8}{'val':>8}{'val top5':>9}{'gap':>8}"
          f"{'val pre-recal':>14}{'at chance':>10}{'wall s':>8}")
    for name, r in outcomes.items():
        pre = "-" if r["val_before_recalibration"] is None else f"{r['val_before_recalibration']:.3f}"
        print(f"{name:<14}{r['bn_momentum']:>9}{r['accuracy']:>8.3f}{r['val_accuracy']:>8.3f}"
              f"{r['val_top5_accuracy']:>9.3f}{r['gap']:>8.3f}{pre:>14}"
              f"{r['epochs_at_chance']:>10}{r['wall_s']:>8.0f}")
    print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
