"""Gradual magnitude pruning (GMP) on digits with LeNet-300-100: dense vs GMP 0->90% and 0->97%
vs one-shot pruning at 97% plus the same fine-tuning epochs; prints a table, writes
bench/results/gmp.json.

All runs share the dense recipe (SGD momentum 0.9, lr 0.05, cosine, batch 64, no augmentation,
seed 0, `--epochs` epochs). GMP: polynomial schedule (power 3) from 0 at step 0 to the final
sparsity at `--end-fraction` of the training steps, a mask update every half epoch, then the rest
of the epochs with the masks frozen (the fine-tuning). One-shot: the dense run's final weights
pruned at 97% by global magnitude, then fine-tuned for the same number of epochs as GMP's frozen
phase, continuing the dense learning-rate schedule from there (lottery.points.recipe). Every
pruning excludes the classifier (`logits`), so sparsity counts fc1 and fc2.

A last run repeats GMP 90% in mixed precision (bfloat16 on a CPU).

Figures to reach (issue 12): GMP 90% within 1 point of dense; GMP 97% within 3 points of dense and
>= 4 points above one-shot 97% + fine-tuning; bfloat16 within 1.5 points of float32, no pruned
weight non-zero.

Usage: .venv/bin/python bench/gmp.py [--epochs 30] [--end-fraction 0.67] [--work DIR]
"""
from __future__ import annotations

import argparse
import logging
import math
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

log = logging.getLogger("bench.gmp")
RESULTS = REPO / "bench" / "results" / "gmp.json"


def _prepare_digits(out: Path) -> Path:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-m", "bigticket", "etl", "prepare", "--source", "digits",
                    "--out", str(out), "--resize", "fixed:16", "--format", "tfrecord",
                    "--shards", "3", "--validation-shards", "2"], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return out


def _final(run) -> dict:
    from train.run_files import read_history

    history = read_history(run)
    return {"run": str(run.root), "val_accuracy": history[-1]["val_accuracy"],
            "sparsity": history[-1].get("sparsity", 0.0),
            "train_s": round(sum(r.get("time_s", 0.0) for r in history), 1)}


def _nonzero_pruned(run) -> int:
    """Weights of the final checkpoint that the last GMP mask prunes but are not zero."""
    import numpy as np

    from lottery.prune.masks import load_mask
    from train.checkpoints import load_checkpoint
    from train.gmp import read_updates

    mask, _ = load_mask(run.root / read_updates(run)[-1]["mask_file"])
    weights = {v.path: v.numpy() for v in load_checkpoint(run.root, "final").weights}
    return sum(int(np.count_nonzero(weights[name][~keep])) for name, keep in mask.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset directory (default: digits at 16x16, prepared here)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--end-fraction", type=float, default=0.67,
                        help="GMP reaches its final sparsity at this fraction of the steps")
    parser.add_argument("--work", help="directory for the dataset and runs (default: temporary)")
    args = parser.parse_args(argv)
    setup_logging()
    from common.settings import make_settings
    from lottery.points.recipe import dense_recipe, open_dense_run, retrain
    from lottery.prune import masks
    from lottery.prune.stats import prunable_weights
    from train.checkpoints import load_checkpoint
    from train.run import train_dense
    from train.settings import DenseSettings

    with tempfile.TemporaryDirectory(prefix="bench-gmp-") as tmp:
        work = Path(args.work or tmp)
        data = Path(args.data) if args.data else _prepare_digits(work / "digits16")
        base = {"data": str(data), "out": str(work / "runs"), "model": "lenet_300_100",
                "epochs": args.epochs, "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine",
                "optimizer": "sgd", "momentum": 0.9, "augment": "none", "seed": 0}
        rows = {}
        t0 = time.perf_counter()
        dense = train_dense(make_settings(DenseSettings, base))
        rows["dense"] = _final(dense)
        spe = open_dense_run(dense.root).record["steps_per_epoch"]
        total = spe * args.epochs
        end = int(round(args.end_fraction * total))
        finetune_epochs = args.epochs - math.ceil(end / spe)
        for final in (0.9, 0.97):
            gmp = train_dense(make_settings(DenseSettings, {
                **base, "gmp_schedule": "polynomial", "gmp_final_sparsity": final,
                "gmp_end_step": end, "gmp_frequency": max(1, spe // 2), "gmp_exclude": ("logits",)}))
            rows[f"gmp_{final:.2f}"] = _final(gmp)
        # Mixed precision (bfloat16 on this CPU): GMP 90% again; pruned weights of the final
        # checkpoint that are not zero (0 expected), accuracy against the float32 GMP run.
        mixed = train_dense(make_settings(DenseSettings, {
            **base, "gmp_schedule": "polynomial", "gmp_final_sparsity": 0.9, "mixed_precision": True,
            "gmp_end_step": end, "gmp_frequency": max(1, spe // 2), "gmp_exclude": ("logits",)}))
        rows["gmp_0.90_bfloat16"] = _final(mixed)
        rows["gmp_0.90_bfloat16"]["nonzero_pruned"] = _nonzero_pruned(mixed)
        import keras

        keras.mixed_precision.set_global_policy("float32")  # the one-shot run below is float32
        # One-shot at 97% of the dense final weights, fine-tuned as long as GMP's frozen phase.
        run = open_dense_run(dense.root)
        model = load_checkpoint(dense.root, "final")
        mask = masks.global_magnitude_mask(prunable_weights(model), 0.97, exclude=("logits",))
        recipe = dense_recipe(run, epochs=finetune_epochs, start_epoch=args.epochs - finetune_epochs)
        result = retrain(model, mask, recipe, label="oneshot-0.97")
        # the pruned model before fine-tuning, for reference
        rows["oneshot_0.97_finetuned"] = {"val_accuracy": result["accuracy"],
                                          "sparsity": masks.mask_sparsity({k: v for k, v in mask.items()
                                                                           if "logits" not in k})["overall"],
                                          "finetune_epochs": finetune_epochs}
        wall = time.perf_counter() - t0

    d = rows["dense"]["val_accuracy"]
    g90, g97 = rows["gmp_0.90"]["val_accuracy"], rows["gmp_0.97"]["val_accuracy"]
    o97 = rows["oneshot_0.97_finetuned"]["val_accuracy"]
    checks = {
        "gmp90_within_1pt_of_dense": d - g90 <= 0.01,
        "gmp97_within_3pt_of_dense": d - g97 <= 0.03,
        "gmp97_4pt_above_oneshot97": g97 - o97 >= 0.04,
        "bfloat16_within_1.5pt_of_float32": abs(rows["gmp_0.90_bfloat16"]["val_accuracy"] - g90) <= 0.015,
        "bfloat16_no_nonzero_pruned_weight": rows["gmp_0.90_bfloat16"]["nonzero_pruned"] == 0,
    }
    print(f"\nLeNet-300-100 on digits 16x16, {args.epochs} epochs ({spe} steps each); GMP ends at step "
          f"{end}, then {finetune_epochs} epochs frozen; one-shot fine-tunes {finetune_epochs} epochs\n")
    print(f"{'run':<26} {'sparsity':>9} {'val acc':>8} {'vs dense':>9}")
    for name, row in rows.items():
        print(f"{name:<26} {row['sparsity']:>9.4f} {row['val_accuracy']:>8.4f} "
              f"{(row['val_accuracy'] - d) * 100:>+8.2f}pt")
    for name, ok in checks.items():
        print(f"  {name}: {'yes' if ok else 'NO'}")
    write_json(RESULTS, {"epochs": args.epochs, "steps_per_epoch": spe, "gmp_end_step": end,
                         "finetune_epochs": finetune_epochs, "rows": rows, "checks": checks,
                         "wall_s": round(wall, 1)})
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
