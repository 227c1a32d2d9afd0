"""bench/capacity.py with every input given as a flag: nothing measured, formulas checked by hand."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "capacity.py"

# Round numbers, so the expected values below can be worked out on paper.
INPUTS = {
    "etl_64_per_core": 1000, "etl_224_per_core": 250, "spark_etl_overhead": 0.25,
    "tfdata_224_per_core": 100, "driver_eval_per_core": 20, "elephas_round_fixed_s": 0.5,
    "grid_overhead_per_point_s": 100, "grid_efficiency": 0.9, "gpu_train_ips": 10,
    "gpu_infer_ips": 36, "params": 1e6, "optimizer_slots": 1, "nodes": 2, "gpus_per_node": 4,
    "cores_per_node": 8, "cpus_per_grid_rank": 4, "batch_per_gpu": 8, "epochs": 2,
    "averaging_k": 10, "driver_states_per_round": 10, "reduce_max_fan_in": 4, "tree_level_s": 0.1,
    "driver_gbps": 8, "interconnect_gbps": 8,
    "allreduce_latency_s": 0.001, "allreduce_overlap": 0.5, "fs_gbps": 8, "jpeg_kb": 100,
    "spark_startup_s": 60, "train_images": 3600, "val_images": 360, "grid_masks": 3,
    "grid_rewinds": 2, "grid_replicates": 2, "grid_epochs": 2, "grid_gpus": 5,
    "gpu_hour_usd": 3, "cpu_node_hour_usd": 1,
}


def _run(tmp_path, inputs: dict, *extra: str) -> subprocess.CompletedProcess:
    flags = [arg for name, value in inputs.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    return subprocess.run([sys.executable, str(SCRIPT), "--no-measure", "--out", str(tmp_path / "plan.json"),
                           *flags, *extra], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_every_input_is_a_flag_and_every_formula_matches_a_hand_computation(tmp_path):
    done = _run(tmp_path, INPUTS)
    assert done.returncode == 0, done.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {name: v["source"] for name, v in plan["inputs"].items()} == {name: "flag" for name in INPUTS}
    got = {row["name"]: row["value"] for row in plan["plan"]}

    # Elephas round: an 8 MB state (1e6 weights x 4 B x (1 + 1 slot)); 8 workers, fan-in <= 4: two
    # levels of fan-in 3 (ceil(8/3) = 3 merges, then 1), each 0.1 s + 3 x 16 MB at 8 Gbit/s
    # (0.048 s); the driver sends it once and receives 10 at 8 Gbit/s (0.088 s); 0.5 s fixed.
    assert got["state_mb"] == pytest.approx(8.0)
    assert (got["tree_fan_in"], got["tree_levels"]) == (3, 2)
    assert got["tree_reduce_s"] == pytest.approx(2 * (0.1 + 0.048))
    round_s = 0.5 + 0.296 + 0.088
    assert got["elephas_round_s"] == pytest.approx(round_s)
    # Epoch averaging: 3600 images on 8 GPUs at min(10, 8 cores x 100 / 4) = 10 img/s -> 45 s, one
    # round, the driver scoring 360 images at 20 img/s x 8 cores (2.25 s); 2 epochs; 8 GPUs at 3 USD.
    epoch_s = 45 + round_s + 2.25
    assert got["elephas_epoch_epoch_s"] == pytest.approx(epoch_s)
    assert got["elephas_epoch_wall_h"] == pytest.approx(2 * epoch_s / 3600)
    assert got["elephas_epoch_cost_usd"] == pytest.approx(8 * 2 * epoch_s / 3600 * 3)
    # K-step: ceil(3600 / (8 x 8)) = 57 steps per epoch, ceil(57 / 10) = 6 rounds.
    assert got["elephas_ksteps_rounds_per_epoch"] == 6
    # Grid: 12 points, each 2 x (3600 / 10 + 360 / 36) + 100 = 840 s; 5 GPUs run 3 waves (0.7 h),
    # worse than 12 x 840 s / (5 x 0.9) = 0.622 h; cost 5 x 0.7 x 3 = 10.5 USD.
    assert got["grid_points"] == 12
    assert got["grid_point_h"] == pytest.approx(840 / 3600)
    assert got["grid_wall_h"] == pytest.approx(0.7)
    assert got["grid_cost_usd"] == pytest.approx(10.5)
    # ETL at 224 px: 3960 images x 1.25 / (2 nodes x 8 cores x 250) = 1.2375 s of CPU, less than
    # reading 3960 x 100 kB at 8 Gbit/s (0.396 s)? No: more, so CPU-bound; plus 60 s start-up.
    assert got["etl_224_wall_h"] == pytest.approx((3960 * 1.25 / 4000 + 60) / 3600)
    # Each result is printed beside its formula with the inputs put in.
    assert "0.5 + 0.296 + 8 * 8e6 * (1 + 10) / (8 * 1e9)" in done.stdout


def test_a_changed_input_changes_only_what_depends_on_it(tmp_path):
    base = _run(tmp_path, INPUTS)
    before = {r["name"]: r["value"] for r in json.loads((tmp_path / "plan.json").read_text())["plan"]}
    faster = _run(tmp_path, {**INPUTS, "gpu_train_ips": 20})
    after = {r["name"]: r["value"] for r in json.loads((tmp_path / "plan.json").read_text())["plan"]}
    assert base.returncode == faster.returncode == 0
    assert after["epoch_compute_s"] == pytest.approx(before["epoch_compute_s"] / 2)
    assert after["etl_224_wall_h"] == before["etl_224_wall_h"]


def test_a_missing_figure_without_measurement_names_its_flag(tmp_path):
    inputs = {k: v for k, v in INPUTS.items() if k != "tfdata_224_per_core"}
    done = _run(tmp_path, inputs)
    # The tf.data figure has no bench result file: it is only measured or given.
    assert done.returncode != 0
    assert "--tfdata-224-per-core" in done.stderr
