"""Adversarial robustness on digits with LeNet-300-100: attack strength and invariants, the cost of
an evaluation, adversarial training, and adversarially retrained tickets; prints tables, writes
bench/results/robustness.json.

Every stage is a real `bigticket` process (etl prepare, train dense, lottery plan / run /
robustness), as a user runs them:
  1. a natural and a PGD-trained dense network (eps 0.1, 7 steps; --epochs each, no augmentation);
  2. both under FGSM, PGD-10 and PGD-40 at eps 0, 0.02, 0.05, 0.1, 0.2 (train.attacks);
  3. the cost of PGD-10 evaluation against clean evaluation, per PGD step, on the digits
     validation split and on 4,096 synthetic images (compiled functions, warm, median of repeats);
  4. grids at sparsities 0.8 and 0.9 with random re-init controls: on the natural run (natural
     retraining) and on the adversarial run (adversarial retraining at eps 0.1); each evaluated by
     a robustness grid (PGD-10 at eps 0, 0.05, 0.1, 0.2) run by `lottery run`.
Targets (issue 13): natural PGD-10 accuracy <= 60% at 0.1 and <= 5% at 0.2; adversarial training
>= 75% at 0.1 and >= natural + 30 points, clean within 2 points; adversarial tickets within 4
points of the dense adversarial network at 0.1; cost <= ~2x clean evaluation per PGD step.

Usage: .venv/bin/python bench/robustness.py [--epochs 30] [--work DIR]
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import read_json, write_json  # noqa: E402
from common.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.robustness")
RESULTS = REPO / "bench" / "results" / "robustness.json"
EPSILONS = (0.0, 0.02, 0.05, 0.1, 0.2)
ATTACKS = {"FGSM": dict(attack="fgsm"), "PGD-10": dict(attack="pgd", steps=10),
           "PGD-40": dict(attack="pgd", steps=40)}


def _bigticket(*args: str) -> str:
    """Run one `bigticket` command; its last output line."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bigticket", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True)
    log.info("bigticket %s: %.1fs", " ".join(args[:2]), time.perf_counter() - t0)
    if proc.returncode != 0:
        raise SystemExit(f"bigticket {' '.join(args)} failed (exit {proc.returncode})")
    return proc.stdout.strip().splitlines()[-1]


def _validation(data: str, size: int):
    from train.data import make_dataset, open_dataset

    return make_dataset(open_dataset(data), "validation", batch_size=256, training=False,
                        input_size=size, cache=True)


def attack_table(run_dir: str, data: str, size: int) -> dict:
    import keras

    from train.attacks import AttackConfig, robust_accuracy

    model = keras.models.load_model(str(Path(run_dir) / "model.keras"), compile=False)
    val = _validation(data, size)
    return {name: {str(e): r["accuracy"] for e, r in
                   robust_accuracy(model, val, EPSILONS, AttackConfig(**kw)).items()}
            for name, kw in ATTACKS.items()}


def _median_time(fn, repeats: int = 5) -> float:
    fn()  # warm: traced and compiled
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def eval_cost(run_dir: str, data: str, size: int) -> dict:
    """Seconds of a clean and of a PGD-10 (eps 0.1) evaluation; the ratio per PGD step."""
    import keras
    import numpy as np
    import tensorflow as tf

    from train.attacks import AttackConfig, RobustEvaluator

    model = keras.models.load_model(str(Path(run_dir) / "model.keras"), compile=False)
    evaluator = RobustEvaluator(model, AttackConfig(steps=10))
    rng = np.random.default_rng(0)
    synthetic = [(tf.constant(rng.uniform(0, 255, (256, size, size, 3)).astype("float32")),
                  tf.constant(rng.integers(0, 10, 256).astype("int32"))) for _ in range(16)]
    cases = {"digits validation (359)": list(_validation(data, size)), "synthetic (4096)": synthetic}
    out = {}
    for name, batches in cases.items():
        # Keras' evaluate is the clean evaluation a point's result comes from.
        model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        x = tf.concat([b[0] for b in batches], 0)
        y = tf.concat([b[1] for b in batches], 0)
        clean = _median_time(lambda x=x, y=y: model.evaluate(x, y, batch_size=256, verbose=0))
        # The bare compiled forward pass over the same batches (no Keras evaluate overhead): the
        # strict baseline; a PGD step is a forward and a backward pass, ~2-3 forwards.
        forward = _median_time(lambda b=batches: evaluator.evaluate(b, [0.0]))
        pgd = _median_time(lambda b=batches: evaluator.evaluate(b, [0.1]))
        out[name] = {"clean_s": clean, "forward_s": forward, "pgd10_s": pgd,
                     "per_step_ratio": pgd / (10 * clean),
                     "per_step_ratio_vs_forward": pgd / (10 * forward)}
    return out


def grid_robustness(run_dir: str, adversarial: bool, eps: str) -> dict:
    """Plan and run a 0.8/0.9 grid with random re-init controls, then its robustness grid."""
    extra = ["--adversarial", "pgd", "--adv-epsilon", "0.1"] if adversarial else []
    grid = _bigticket("lottery", "plan", "--run", run_dir, "--sparsities", "0.8,0.9",
                      "--controls", "random_reinit", *extra)
    _bigticket("lottery", "run", "--grid", grid)
    sub = _bigticket("lottery", "robustness", "--grid", grid, "--eps", eps, "--attack", "pgd",
                     "--steps", "10")
    _bigticket("lottery", "run", "--grid", sub)
    rows = {}
    for path in sorted(Path(sub, "results").glob("*.json")):
        r = read_json(path)["result"]
        rows.setdefault(r["target"], {"sparsity": r["point"].get("sparsity"),
                                      "control": r["point"].get("control")})[str(r["epsilon"])] = \
            r["robust_accuracy"]
    return {"grid": grid, "robustness_grid": sub, "rows": rows}


def _print_attacks(name: str, table: dict) -> None:
    print(f"\n{name}: accuracy under attack (eps on the [0, 1] scale)")
    print(f"{'attack':<8}" + "".join(f"{e:>9g}" for e in EPSILONS))
    for attack, row in table.items():
        print(f"{attack:<8}" + "".join(f"{100 * row[str(e)]:>8.1f}%" for e in EPSILONS))


def invariants(table: dict) -> dict:
    pgd10, pgd40, fgsm = table["PGD-10"], table["PGD-40"], table["FGSM"]
    keys = [str(e) for e in EPSILONS]
    return {
        "eps0_equal_across_attacks": len({table[a]["0.0"] for a in table}) == 1,
        "pgd10_le_fgsm_plus_1pt": all(pgd10[k] <= fgsm[k] + 0.01 for k in keys),
        "pgd40_le_pgd10_plus_1pt": all(pgd40[k] <= pgd10[k] + 0.01 for k in keys),
        "non_increasing_over_eps_1pt": all(row[b] <= row[a] + 0.01 for row in table.values()
                                           for a, b in zip(keys, keys[1:])),
    }


def compute_checks(tables: dict, grids: dict, cost: dict) -> dict:
    """The issue's targets. Tickets: 'within 4 points' read literally (|ticket - dense| <= 4) and
    as the intent (no more than 4 points below the dense adversarial network)."""
    nat, adv_t = tables["natural"]["PGD-10"], tables["adversarial"]["PGD-10"]
    adv_dense_01 = grids["adversarial"]["rows"]["dense"]["0.1"]
    tickets = {t: r for t, r in grids["adversarial"]["rows"].items()
               if t != "dense" and r["control"] == "none"}
    return {
        "natural_pgd10_at_0.1_le_60": nat["0.1"] <= 0.60,
        "natural_pgd10_at_0.2_le_5": nat["0.2"] <= 0.05,
        "adversarial_pgd10_at_0.1_ge_75": adv_t["0.1"] >= 0.75,
        "adversarial_ge_natural_plus_30": adv_t["0.1"] >= nat["0.1"] + 0.30,
        "adversarial_clean_within_2": abs(adv_t["0.0"] - nat["0.0"]) <= 0.02,
        "adversarial_tickets_within_4_of_dense": all(abs(r["0.1"] - adv_dense_01) <= 0.04
                                                     for r in tickets.values()),
        "adversarial_tickets_not_below_dense_minus_4": all(r["0.1"] >= adv_dense_01 - 0.04
                                                           for r in tickets.values()),
        "cost_per_step_le_2x": all(c["per_step_ratio"] <= 2.0 for c in cost.values()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="dense and retraining epochs")
    parser.add_argument("--work", help="directory for the dataset and runs (default: temporary)")
    args = parser.parse_args(argv)
    setup_logging()
    size = 16
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-robust-") as tmp:
        work = Path(args.work or tmp)
        data = str(work / "digits16")
        if not Path(data, "_SUCCESS").is_file():
            _bigticket("etl", "prepare", "--source", "digits", "--out", data, "--resize",
                       "fixed:16", "--format", "tfrecord", "--shards", "2")
        dense = ["train", "dense", "--data", data, "--model", "lenet_300_100", "--out",
                 str(work / "runs"), "--epochs", str(args.epochs), "--augment", "none",
                 "--rewind", "0ep"]
        natural = _bigticket(*dense)
        adv = _bigticket(*dense, "--adversarial", "pgd", "--adv-epsilon", "0.1")
        tables = {"natural": attack_table(natural, data, size),
                  "adversarial": attack_table(adv, data, size)}
        cost = eval_cost(natural, data, size)
        grids = {"natural": grid_robustness(natural, False, "0,0.05,0.1,0.2"),
                 "adversarial": grid_robustness(adv, True, "0,0.05,0.1,0.2")}

    checks = compute_checks(tables, grids, cost)
    result = {"dataset": "digits 16x16", "model": "lenet_300_100", "epochs": args.epochs,
              "adversarial_training": {"attack": "pgd", "epsilon": 0.1, "steps": 7},
              "attacks": tables, "invariants": {k: invariants(v) for k, v in tables.items()},
              "cost": cost, "grids": grids, "checks": checks, "cpu_count": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0], "wall_s": time.perf_counter() - t_start}
    write_json(RESULTS, result)
    for name, table in tables.items():
        _print_attacks(f"{name} dense network", table)
    print(f"\nevaluation cost (PGD-10 at 0.1 vs clean evaluation: Keras evaluate, and the bare "
          f"compiled forward pass)\n{'data':<26}{'evaluate s':>11}{'forward s':>10}{'PGD-10 s':>10}"
          f"{'/step vs evaluate':>19}{'/step vs forward':>18}")
    for name, c in cost.items():
        print(f"{name:<26}{c['clean_s']:>11.3f}{c['forward_s']:>10.3f}{c['pgd10_s']:>10.3f}"
              f"{c['per_step_ratio']:>18.2f}x{c['per_step_ratio_vs_forward']:>17.2f}x")
    for name, g in grids.items():
        print(f"\n{name} grid under PGD-10 ({g['robustness_grid']})")
        print(f"{'network':<48}{'sparsity':>9}" + "".join(f"{e:>8}" for e in ("0", "0.05", "0.1", "0.2")))
        for target, r in sorted(g["rows"].items(), key=lambda kv: (kv[1]["sparsity"] or 0, kv[0])):
            print(f"{target:<48}{r['sparsity'] or 0:>9.3f}" + "".join(
                f"{100 * r.get(e, float('nan')):>7.1f}%" for e in ("0.0", "0.05", "0.1", "0.2")))
    print("\nchecks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    for name, inv in result["invariants"].items():
        print(f"invariants ({name}): " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}"
                                                     for k, v in inv.items()))
    print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
