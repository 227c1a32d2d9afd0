"""Replicates and retraining modes: ids, grid names, extending a finished grid, and real points."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from common.atomic import read_json
from common.settings import make_settings
from lottery.grid.plan import build_tasks, grid_hash, load_tasks, plan
from lottery.grid.settings import GridSettings
from lottery.points.task import Task

POSITIONS = {"init": 0.0, "1ep": 1.0, "final": 3.0}
PINNED = {"sparsities": [0.9], "controls": "random_reinit,random_mask", "imp_rounds": 2, "imp_rate": 0.2,
          "epochs": 1, "seed": 4, "rewind": "init,1ep"}


class _Sparsity(dict):
    def __missing__(self, key):  # a random twin has its base mask's sparsity
        return 0.9


def test_replicate_0_and_weights_mode_keep_ids_seeds_and_grid_names():
    one = make_settings(GridSettings, PINNED)
    three = make_settings(GridSettings, {**PINNED, "replicates": 3, "retrain_modes": "finetune,weights,lr"})
    assert grid_hash(one) == grid_hash(three) == grid_hash(make_settings(GridSettings, {**PINNED,
                                                                                       "replicates": 2}))
    assert three.retrain_modes == ("weights", "lr", "finetune")  # one canonical order
    old = {t.task_id: t.to_dict() for t in build_tasks(one, POSITIONS, _Sparsity())}
    new = {t.task_id: t.to_dict() for t in build_tasks(three, POSITIONS, _Sparsity())}
    assert all(new[k] == v for k, v in old.items())  # byte-identical stored tasks
    assert "replicate" not in str(old) and "retrain_mode" not in str(old)
    added = sorted(set(new) - set(old))
    assert "oneshot-global-s9000-init-none-rep2" in added
    assert "oneshot-global-s9000-1ep-random_mask-lr-rep1" in added
    assert "oneshot-global-s9000-final-none-finetune" in added and "imp-global-r2-p2000-init-rep1" in added
    # lr/finetune keep weights, so no random re-init control; finetune has one rewind ("final").
    assert not [k for k in new if "random_reinit-lr" in k or "random_reinit-finetune" in k]
    assert not [k for k in new if "-init-none-finetune" in k]
    # Every replicate draws its own random mask and seeds; the mode and replicate are stored.
    twins = {new[f"oneshot-global-s9000-init-random_mask{s}"]["mask_id"] for s in ("", "-rep1", "-rep2")}
    assert len(twins) == 3
    assert len({t["seed"] for t in new.values()}) == len(new)
    rep = Task.from_dict(new["oneshot-global-s9000-init-none-lr-rep1"])
    assert (rep.replicate, rep.retrain_mode) == (1, "lr")
    assert rep.result_fields()["retrain_mode"] == "lr"
    assert Task.from_dict(old["oneshot-global-s9000-init-none"]).result_fields()["replicate"] == 0


def test_bad_replicate_settings_name_the_field():
    from common.settings import SettingsError

    for values, field in (({"replicates": 0}, "replicates"), ({"retrain_modes": "rewind"}, "retrain_modes"),
                          ({"finetune_lr": 0.01}, "finetune_lr"),
                          ({"retrain_modes": "lr", "sparsities": None, "imp_rounds": 2}, "retrain_modes")):
        with pytest.raises((SettingsError, ValueError), match=field):
            make_settings(GridSettings, {"sparsities": [0.5], **values})


@pytest.mark.slow
def test_more_replicates_and_modes_run_only_the_new_points(digits_dir, tmp_path):
    """Real dense run, real points. Plan 1 replicate and run; plan again with 2 replicates and all
    three modes: the same grid directory, and only the new points train. lr/finetune start from the
    masked final weights (their pruned_accuracy is that model's accuracy, measured here apart)."""

    from lottery.grid.scheduler import run_grid
    from lottery.points.masked_training import apply_mask
    from lottery.prune import masks
    from train.checkpoints import load_checkpoint
    from train.data import make_dataset, open_dataset
    from train.run import train_dense
    from train.settings import DenseSettings

    run = train_dense(DenseSettings(data=str(digits_dir), model="lenet_300_100", out=str(tmp_path),
                                    epochs=2, batch_size=64, lr=0.05, lr_schedule="cosine",
                                    augment="none"))
    base = {"sparsities": [0.8], "epochs": 1, "controls": ["random_mask"]}
    grid = plan(run.root, make_settings(GridSettings, base))
    assert len(run_grid(grid.root).executed) == 2
    first = {p.name: p.stat().st_mtime_ns for p in grid.results.glob("*.json")}

    again = plan(run.root, make_settings(GridSettings, {**base, "replicates": 2,
                                                        "retrain_modes": ["weights", "lr", "finetune"]}))
    assert again.root == grid.root
    assert len(load_tasks(grid.root)) == 12  # 2 replicates x (weights 2 + lr 2 + finetune 2)
    executed = run_grid(grid.root).executed
    assert len(executed) == 10 and not {f"{t}.json" for t in executed} & set(first)
    assert {p.name: p.stat().st_mtime_ns for p in grid.results.glob("*.json") if p.name in first} == first
    # Planning with fewer replicates keeps the grid as it is; running trains nothing.
    plan(run.root, make_settings(GridSettings, base))
    assert len(load_tasks(grid.root)) == 12 and run_grid(grid.root).executed == []

    results = {p.stem: read_json(p)["result"] for p in grid.results.glob("*.json")}
    dense_lr = [float(r["lr"]) for r in csv.DictReader(open(run.history, newline=""))]
    # lr replays the dense schedule from the rewind point (init); finetune runs at the last rate.
    assert results["oneshot-global-s8000-init-none-lr"]["history"][0]["lr"] == pytest.approx(dense_lr[0])
    fine = results["oneshot-global-s8000-final-none-finetune-rep1"]
    assert fine["history"][0]["lr"] == pytest.approx(dense_lr[-1]) == pytest.approx(fine["finetune_lr"])
    # The masked final model's accuracy, measured apart, is where lr and finetune start.
    mask, _ = masks.load_mask(grid.mask("global-s8000"))
    model = load_checkpoint(run.root, "final")
    apply_mask(model, mask)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    dense = read_json(run.settings)["settings"]
    val = make_dataset(open_dataset(digits_dir), "validation", training=False,
                       batch_size=dense["batch_size"], input_size=dense["input_size"])
    expected = model.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    for task_id in ("oneshot-global-s8000-init-none-lr", "oneshot-global-s8000-final-none-finetune-rep1"):
        assert results[task_id]["pruned_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert "pruned_accuracy" not in results["oneshot-global-s8000-init-none"]
    # Replicate 1 reads the data in another order: its first epoch differs from replicate 0's.
    loss0 = results["oneshot-global-s8000-init-none"]["history"][0]["loss"]
    assert results["oneshot-global-s8000-init-none-rep1"]["history"][0]["loss"] != loss0
    rand = [masks.load_mask(grid.mask(t.mask_id))[0] for t in load_tasks(grid.root)
            if t.control == "random_mask" and t.retrain_mode == "weights"]
    assert len(rand) == 2 and any(not np.array_equal(rand[0][k], rand[1][k]) for k in rand[0])

    from lottery.report.build import build_report

    text = build_report(grid.root)["report"].read_text()
    assert "## Tickets vs controls, paired over replicates" in text
    assert "## Retraining modes on the same masks" in text


@pytest.mark.slow
def test_grid_over_replicate_dense_runs(digits_dir, tmp_path, capsys):
    """`lottery plan --run R0 --run R1`: replicate 1 retrains R1 with masks from R1's own final
    weights; a run that differs in more than its seed is refused, naming the field."""
    from lottery.cli import main
    from lottery.grid.scheduler import run_grid
    from lottery.prune import masks
    from train.run import train_dense
    from train.settings import DenseSettings

    def dense(**change):
        return train_dense(DenseSettings(**{"data": str(digits_dir), "model": "lenet_300_100",
                                            "out": str(tmp_path), "epochs": 1, "batch_size": 64,
                                            "lr": 0.05, "augment": "none", **change})).root

    r0, r1, other = dense(seed=0), dense(seed=1), dense(seed=2, lr=0.1)
    assert r0 != r1  # the seed is part of a dense run's identity
    flags = ["plan", "--sparsities", "0.8", "--epochs", "1", "--controls", "random_mask"]
    assert main([*flags, "--run", str(r0), "--run", str(other)]) == 2
    assert "settings.lr is 0.1 there, 0.05 in the first run" in capsys.readouterr().err
    assert main([*flags, "--run", str(r0), "--run", str(r1)]) == 0
    grid_root = capsys.readouterr().out.strip().splitlines()[-1]
    tasks = {t.task_id: t for t in load_tasks(grid_root)}
    assert sorted(tasks) == ["oneshot-global-s8000-init-none", "oneshot-global-s8000-init-none-rep1",
                             "oneshot-global-s8000-init-random_mask",
                             "oneshot-global-s8000-init-random_mask-rep1"]
    rep1 = tasks["oneshot-global-s8000-init-none-rep1"]
    assert (rep1.run, rep1.mask_id, rep1.replicate) == (r1.name, "global-s8000-rep1", 1)
    assert tasks["oneshot-global-s8000-init-random_mask-rep1"].base_mask_id == "global-s8000-rep1"
    from common.paths import GridPaths

    grid = GridPaths(Path(grid_root))
    m0, m1 = (masks.load_mask(grid.mask(m))[0] for m in ("global-s8000", "global-s8000-rep1"))
    assert any(not np.array_equal(m0[k], m1[k]) for k in m0)  # drawn from another run's weights
    assert len(run_grid(grid.root).executed) == 4
    rec = read_json(grid.result("oneshot-global-s8000-init-none-rep1"))
    assert rec["result"]["run"] == r1.name and rec["result"]["replicate"] == 1
