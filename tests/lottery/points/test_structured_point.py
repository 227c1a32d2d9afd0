"""The structured grid end to end on real digits: a ResNet-20 dense run with the Early-Bird detector,
channel masks planned at its checkpoints and its Early-Bird ticket, compacted and retrained points
run by the grid scheduler under a real `mpiexec -n 2`, and the report of those results."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.atomic import read_json
from common.paths import DenseRunPaths, GridPaths
from lottery.grid.plan import done_ids, load_plan

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
EPOCHS = 3


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def eb_run(digits_dir, tmp_path_factory) -> DenseRunPaths:
    """A real dense run: ResNet-20 (width 4) on 16x16 digits, BN-scale L1 penalty, the Early-Bird
    detector on with a short window and loose threshold so that 3 epochs draw a ticket."""
    from train.run import train_dense
    from train.settings import DenseSettings

    settings = DenseSettings(data=str(digits_dir), model="resnet20", model_options={"width": 4},
                             out=str(tmp_path_factory.mktemp("runs")), epochs=EPOCHS,
                             rewind=("1ep", "2ep"), batch_size=64, lr=0.05, augment="crop", seed=1,
                             bn_l1=1e-4, early_bird=True, early_bird_ratio=0.5, early_bird_window=2,
                             early_bird_threshold=0.9)
    run = train_dense(settings)
    info = read_json(run.early_bird)
    assert info["drawn_epoch"] is not None, info  # the fixture needs a drawn ticket
    return run


def test_plan_draws_one_mask_per_checkpoint_and_ratio(eb_run, capsys):
    from lottery.cli import main
    from lottery.prune.channel_masks import select_channels
    from lottery.prune.masks import load_mask
    from train.checkpoints import load_checkpoint

    args = ["plan", "--run", str(eb_run.root), "--channel-ratios", "0.3,0.5", "--criterion", "bn",
            "--draw", "1ep,2ep", "--early-bird", "--sparsities", "0.5", "--rewind", "init",
            "--epochs", "1"]
    assert main(args) == 0
    grid = GridPaths(_last_line(capsys))
    tasks = load_plan(grid.root)["tasks"]
    structured = [t for t in tasks if t.kind == "structured"]
    assert [t.kind for t in tasks].count("oneshot") == 1 and len(structured) == 6
    drawn = read_json(eb_run.early_bird)["drawn_epoch"]
    assert {(t.rewind, t.draw_epoch) for t in structured} == {
        ("1ep", 1.0), ("2ep", 2.0), ("early_bird", float(drawn))}
    # Each mask is select_channels on its own checkpoint's weights (Early-Bird: the ticket's).
    for draw in ("2ep", "early_bird"):
        model = load_checkpoint(eb_run.root, draw)
        for ratio in (0.3, 0.5):
            (task,) = [t for t in structured if (t.rewind, t.ratio) == (draw, ratio)]
            mask, meta = load_mask(grid.mask(task.mask_id))
            want = select_channels(model, "bn", ratio, scope="global")
            assert sorted(mask) == sorted(want) and meta["scope"] == "global"
            for name in want:
                np.testing.assert_array_equal(mask[name], want[name], err_msg=name)
    # Planning again: the same directory, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in grid.root.rglob("*") if p.is_file()}
    assert main(args) == 0
    assert _last_line(capsys) == str(grid.root)
    assert {p: p.stat().st_mtime_ns for p in grid.root.rglob("*") if p.is_file()} == before


def test_plan_names_a_missing_draw_point(eb_run, capsys):
    from lottery.cli import main

    assert main(["plan", "--run", str(eb_run.root), "--channel-ratios", "0.5", "--draw", "3ep"]) == 2
    assert "draw: '3ep' is not a saved point" in capsys.readouterr().err


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for name in list(env):  # an enclosing launcher's variables would confuse the world-size check
        if name.startswith(("PMI_", "OMPI_", "SLURM_", "PMIX_", "MPI_LOCAL")):
            del env[name]
    return env


def _mpirun(grid: GridPaths) -> subprocess.CompletedProcess:
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "lottery", "run",
           "--grid", str(grid.root)]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def ran_grid(eb_run) -> GridPaths:
    """A structured grid (ratio 0.5 at 1ep and at the Early-Bird ticket, 1 retraining epoch) run by
    the real grid point under `mpiexec -n 2`, one point per rank."""
    from common.settings import make_settings
    from lottery.grid.plan import plan
    from lottery.grid.settings import GridSettings

    grid = plan(eb_run.root, make_settings(GridSettings, {"channel_ratios": [0.5], "draw": ["1ep"],
                                                          "early_bird": True, "epochs": 1}))
    proc = _mpirun(grid)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2/2 points done" in proc.stdout
    return grid


def _records(grid: GridPaths) -> list[dict]:
    return [read_json(grid.result(t.task_id)) for t in load_plan(grid.root)["tasks"]]


def _validation(run: DenseRunPaths):
    from lottery.points.recipe import dense_recipe, open_dense_run

    return dense_recipe(open_dense_run(run.root), epochs=1).validation_data


@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_points_compact_retrain_and_save_the_smaller_network(eb_run, ran_grid):
    import keras
    import tensorflow as tf

    from lottery.prune.channel_masks import apply_structured
    from lottery.prune.masks import load_mask
    from train.checkpoints import load_checkpoint

    records = _records(ran_grid)
    assert {r["task"]["rewind"] for r in records} == {"1ep", "early_bird"}
    assert {r["worker"]["rank"] for r in records} == {0, 1}   # one point per rank
    validation = _validation(eb_run)
    for record in records:
        task, result = record["task"], record["result"]
        assert result["params"] < result["params_dense"] and result["flops"] < result["flops_dense"]
        assert result["file_bytes"] < result["file_bytes_dense"]
        assert result["images_per_s"] > 0 and result["images_per_s_dense"] > 0
        assert result["speedup"] == pytest.approx(result["images_per_s"] / result["images_per_s_dense"])
        assert result["sparsity"] == pytest.approx(1 - result["params"] / result["params_dense"])
        assert [row["epoch"] for row in result["history"]] == [1]
        # Before retraining, the compacted network is the masked dense one: same accuracy.
        masked = load_checkpoint(eb_run.root, task["rewind"])
        apply_structured(masked, load_mask(ran_grid.mask(task["mask_id"]))[0])
        masked.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        acc = masked.evaluate(validation, verbose=0, return_dict=True)["accuracy"]
        assert result["accuracy_before"] == pytest.approx(acc, abs=1e-6)
        # The saved model is the retrained compact network: its size and its accuracy.
        path = ran_grid.compact_model(task["task_id"])
        assert result["compact_model"] == str(path.relative_to(ran_grid.root))
        small = keras.saving.load_model(path, safe_mode=True, compile=False)
        assert small.count_params() == result["params"]
        small.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        assert small.evaluate(validation, verbose=0, return_dict=True)["accuracy"] == pytest.approx(
            result["accuracy"], abs=1e-6)
        # ... and its CPU export, in which both networks were timed, computes the same outputs.
        assert result["inference_runtime"] == "litert"
        exported = ran_grid.compact_litert(task["task_id"])
        assert result["compact_litert"] == str(exported.relative_to(ran_grid.root))
        batch = result["inference_batch"]
        x = np.concatenate([xb for xb, _ in validation])[:batch]
        x = np.resize(x, (batch,) + x.shape[1:]).astype(np.float32)
        interpreter = tf.lite.Interpreter(model_path=str(exported), num_threads=1)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]),
                                   small.predict_on_batch(x), rtol=1e-4, atol=1e-5)
    # A finished grid trains nothing when run again (here in this process: no second launch).
    from lottery.grid.scheduler import run_grid

    assert run_grid(ran_grid.root).executed == []
    assert done_ids(ran_grid) == {r["task_id"] for r in records}


@pytest.mark.cluster
def test_report_has_structured_rows_and_early_bird_plots(eb_run, ran_grid, capsys):
    import pyarrow.parquet as pq
    from PIL import Image

    from bigticket.cli import main
    from lottery.report.build import build_report

    out = build_report(ran_grid.root)
    records = {r["task_id"]: r["result"] for r in _records(ran_grid)}
    rows = {r["task_id"]: r for r in pq.read_table(out["parquet"]).to_pylist()}
    assert set(rows) == set(records)
    for task_id, result in records.items():
        row = rows[task_id]
        assert row["kind"] == "structured" and row["ratio"] == 0.5 and row["criterion"] == "bn"
        for column in ("params", "params_dense", "flops", "flops_dense", "file_bytes",
                       "file_bytes_dense", "images_per_s", "images_per_s_dense", "speedup",
                       "accuracy_before", "accuracy", "draw_accuracy", "draw_epoch"):
            assert row[column] == pytest.approx(result[column]), column
    with open(out["csv"], newline="") as fh:
        assert {r["task_id"]: int(r["params"]) for r in csv.DictReader(fh)} == {
            t: r["params"] for t, r in records.items()}
    # The markdown table: the record's numbers, formatted.
    text = out["report"].read_text()
    assert "## Structured pruning (compacted networks)" in text
    drawn = read_json(eb_run.early_bird)["drawn_epoch"]
    for r in records.values():
        draw = "1ep" if r["draw"] == "1ep" else f"early_bird (epoch {drawn})"
        line = next(line for line in text.splitlines() if line.startswith(f"| {draw} |"))
        assert f"{r['params']:,} / {r['params_dense']:,}" in line
        assert f"{r['flops']:,} / {r['flops_dense']:,}" in line
        assert f"| {r['speedup']:.2f}x |" in line
        assert line.endswith(f"| {r['draw_accuracy']:.4f} | {r['accuracy_before']:.4f} | "
                             f"{r['accuracy']:.4f} |")
    assert f"Early-Bird ticket drawn at epoch {drawn} of {EPOCHS} epochs" in text
    assert "one-shot" not in text   # a structured-only grid has no magnitude table
    names = sorted(p.name for p in out["plots"])
    assert names == ["accuracy_vs_channel_ratio.png", "early_bird_distances.png", "training_curves.png"]
    for path in out["plots"]:
        with Image.open(path) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300
    assert main(["report", str(ran_grid.root)]) == 0
    printed = capsys.readouterr().out
    assert "| draw | ratio | criterion |" in printed
    assert str(ran_grid.plots / "early_bird_distances.png") in printed
