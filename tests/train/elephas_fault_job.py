"""Run by tests/train/test_elephas_faults.py in its own process, for its own `local[N,F]` Spark
(Spark allows one context per process, and the tests' shared one does not retry tasks).

The same elephas round three times from the same inputs: fault-free, then with a Python worker
SIGKILLed while training, then with one killed while merging in the averaging tree
(train.faults). Writes OUT/<case>.npz (the averaged arrays) and OUT/<case>.json (the workers'
pids and the killed pid).

    python -m tests.train.elephas_fault_job OUT SHARD_A SHARD_B MASTER
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

CASES = {"clean": None, "train": "train 1 2", "merge": "merge1 0 1"}


def main(out: Path, shard_a: str, shard_b: str, master: str) -> None:
    from common.spark import get_spark
    from tests.train.test_elephas_engine import COMPILE, momentum_sgd, tfrecord_dataset, tiny_model
    from train.elephas_engine import SparkDataParallel
    from train.faults import ENV

    marker = out / "fault"
    os.environ[ENV] = str(marker)  # before Spark starts: its Python workers inherit it
    spark = get_spark("elephas-faults", master, conf={"spark.ui.enabled": "false",
                                                      "spark.ui.showConsoleProgress": "false"})
    # 3 workers in a tree of fan-in 2: merge level 1 has tasks 0 (workers 0, 1) and 1 (worker 2).
    engine = SparkDataParallel(spark, tiny_model, momentum_sgd, COMPILE, tfrecord_dataset, 3,
                               averaging_steps=4, shards=[[shard_a], [shard_b], [shard_a]],
                               max_fan_in=2)
    weights, opt = engine.initial_state()
    for case, fault in CASES.items():
        if fault:
            marker.write_text(fault)
        result = engine.run_round(weights, opt, lr=0.05, steps=None, round_index=1, seed=8)
        fired = Path(f"{marker}.fired")
        killed = None
        if fault:
            text = fired.read_text()  # KeyError-free: the file exists only if a task claimed it
            killed = int(text.split("pid=")[1].split()[0])
            fired.unlink()
        np.savez(out / f"{case}.npz", *(result.weights + result.optimizer_state))
        (out / f"{case}.json").write_text(json.dumps({
            "killed_pid": killed, "records": result.records,
            "pids": [w["pid"] for w in result.metrics["workers"]]}))
    engine.close()
    spark.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
