"""Grid settings and planning against a real (tiny) dense run directory."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.atomic import read_json, write_json
from common.paths import DenseRunPaths, GridPaths
from common.settings import SettingsError, make_settings
from lottery.grid.plan import build_tasks, grid_hash, load_plan, pending_tasks, plan
from lottery.grid.settings import GridSettings

EPOCHS = 3


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A finished dense run of lenet_300_100 as the train stage lays it out: settings.json,
    checkpoints at init, 1ep, 6it and final (real Keras weights files), history.csv, _SUCCESS."""
    import keras

    from train.checkpoints import save_checkpoint
    from train.models import build_model

    run = DenseRunPaths(tmp_path_factory.mktemp("runs") / "dense-0123abcd")
    keras.utils.set_random_seed(3)
    model = build_model("lenet_300_100", 3, 4)
    rng = np.random.default_rng(0)
    for name in ("init", "1ep", "6it", "final"):
        # Each later point drifts from the last, as training would.
        model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in model.get_weights()])
        save_checkpoint(model, run, name)
    write_json(run.settings, {"settings": {"model": "lenet_300_100", "input_size": 4, "model_options": {},
                                           "epochs": EPOCHS, "rewind": ["1ep", "6it"], "data": "unused"},
                              "num_classes": 3, "steps_per_epoch": 4})
    run.history.write_text("epoch,loss,accuracy,val_loss,val_accuracy\n1,1.0,0.5,1.1,0.45\n"
                           "2,0.7,0.7,0.8,0.66\n3,0.5,0.8,0.6,0.74\n")
    run.success.write_text("")
    return run


def _files(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_plan_writes_the_grid_and_is_idempotent(dense_run):
    settings = make_settings(GridSettings, {"sparsities": "0.5,0.9", "rewind": "init,6it,1ep",
                                            "controls": "random_reinit,random_mask",
                                            "imp_rounds": 2, "imp_rate": 0.5})
    grid = plan(dense_run.root, settings)
    resolved = dataclasses.replace(settings, epochs=EPOCHS)
    assert grid.root == dense_run.root / f"lottery-{grid_hash(resolved)}"
    record = load_plan(grid.root)
    assert record["settings"]["epochs"] == EPOCHS   # the dense run's epochs by default
    stats = read_json(grid.stats)
    assert stats["count"] == 48 * 300 + 300 * 100 + 100 * 3   # kernels only, no biases
    from lottery.prune.masks import load_mask, mask_sparsity

    for mid, target in (("global-s5000", 0.5), ("global-s9000", 0.9)):
        mask, _ = load_mask(grid.mask(mid))
        assert mask_sparsity(mask)["overall"] == pytest.approx(target, abs=1e-4)
        twin_id = next(k for k in record["masks"] if k.startswith(mid + "-random"))
        twin, meta = load_mask(grid.mask(twin_id))
        assert meta["random_of"] == mid
        for name in mask:  # same per-layer count, other positions
            assert twin[name].sum() == mask[name].sum()
            assert not np.array_equal(twin[name], mask[name])
    tasks = record["tasks"]
    assert len(tasks) == 2 * 3 * 3 + 3
    assert len({t.task_id for t in tasks}) == len(tasks)
    # Longest first: IMP chains (2 rounds), then by earliest rewind (6it = 1.5 epochs after 1ep).
    assert [t.kind for t in tasks[:3]] == ["imp"] * 3
    assert [t.rewind for t in tasks[:3]] == ["init", "1ep", "6it"]
    assert [t.cost for t in tasks] == sorted((t.cost for t in tasks), reverse=True)
    oneshot_rewinds = [t.rewind for t in tasks[3:]]
    assert oneshot_rewinds == sorted(oneshot_rewinds, key=["init", "1ep", "6it"].index)
    rm = next(t for t in tasks if t.control == "random_mask")
    assert rm.mask_id != rm.base_mask_id and grid.mask(rm.mask_id).is_file()
    assert tasks[0].sparsity == pytest.approx(0.75)
    assert pending_tasks(grid) == tasks
    # Planning again changes nothing: same directory, no file rewritten.
    before = _files(grid.root)
    assert plan(dense_run.root, settings) == grid
    assert _files(grid.root) == before


def test_quantile_grid_records_the_real_sparsity(dense_run):
    settings = make_settings(GridSettings, {"quantiles": [0.3], "scope": "layer", "rewind": ["final"],
                                            "exclude": ["logits"], "epochs": 1})
    grid = plan(dense_run.root, settings)
    (task,) = load_plan(grid.root)["tasks"]
    from lottery.prune.masks import load_mask, mask_sparsity

    mask, meta = load_mask(grid.mask(task.mask_id))
    assert task.threshold == {"kind": "quantile", "value": 0.3}
    assert task.sparsity == mask_sparsity(mask)["overall"]
    assert task.epochs == 1 and task.exclude == ("logits",)
    excluded = [n for n in mask if n.startswith("logits/")]
    assert excluded and all(mask[n].all() for n in excluded)


def test_missing_rewind_point_is_named(dense_run):
    settings = make_settings(GridSettings, {"sparsities": [0.5], "rewind": ["init", "2ep"]})
    with pytest.raises(SettingsError, match=r"rewind: '2ep' is not a saved point .*saved: 1ep, 6it, final, init"):
        plan(dense_run.root, settings)


def test_exclude_pattern_matching_nothing_is_named(dense_run):
    settings = make_settings(GridSettings, {"sparsities": [0.5], "exclude": ["classifier"]})
    with pytest.raises(SettingsError, match="exclude: .*'classifier' matches no prunable weight"):
        plan(dense_run.root, settings)


def test_unfinished_dense_run_is_refused(tmp_path):
    run = DenseRunPaths(tmp_path / "dense-x")
    run.root.mkdir()
    write_json(run.settings, {"settings": {"epochs": 2}})
    with pytest.raises(SettingsError, match="dense-x: the dense run is not finished"):
        plan(run.root, make_settings(GridSettings, {"sparsities": [0.5]}))


@pytest.mark.parametrize("values, field", [
    ({"sparsities": [0.5], "quantiles": [0.5]}, "sparsities/quantiles"),
    ({}, "sparsities/quantiles"),
    ({"sparsities": [1.0]}, "sparsities"),
    ({"sparsities": [0.5, 0.5]}, "sparsities"),
    ({"sparsities": [0.5], "rewind": ["3epochs"]}, "rewind"),
    ({"sparsities": [0.5], "controls": ["shuffle"]}, "controls"),
    ({"sparsities": [0.5], "imp_rate": 1.5}, "imp_rate"),
    ({"sparsities": [0.5], "colour": "red"}, "colour: unknown setting"),
    ({"channel_ratios": [0.3]}, "draw: channel_ratios need checkpoints"),
    ({"sparsities": [0.5], "draw": ["1ep"]}, "channel_ratios: draw/early_bird are set"),
    ({"sparsities": [0.5], "early_bird": True}, "channel_ratios: draw/early_bird are set"),
    ({"channel_ratios": [0.0], "draw": ["1ep"]}, "channel_ratios: 0.0 must lie strictly between 0 and 1"),
    ({"channel_ratios": "0.5,1", "draw": ["1ep"]}, "channel_ratios: 1.0 must lie strictly between"),
    ({"channel_ratios": [0.5], "draw": "1ep,ten"}, "draw: 'ten' is not a checkpoint"),
    ({"channel_ratios": [0.5], "draw": "1ep,1EP"}, "draw: duplicate draw points"),
    ({"channel_ratios": [0.5], "draw": ["1ep"], "criterion": "l3"}, "criterion"),
    ({"channel_ratios": [0.5], "draw": ["1ep"], "channel_scope": "net"}, "channel_scope"),
])
def test_bad_settings_name_the_field(values, field):
    with pytest.raises(SettingsError, match=field):
        make_settings(GridSettings, values)


def test_imp_only_grid_and_pinned_hash():
    s = make_settings(GridSettings, {"imp_rounds": 3, "epochs": 2})
    tasks = build_tasks(s, {"init": 0.0}, {})
    assert [(t.kind, t.imp_rounds, t.cost) for t in tasks] == [("imp", 3, 6.0)]
    # Pinned: a change here renames every existing grid directory. Magnitude grids keep the name
    # they had before grids gained the structured fields.
    magnitude = make_settings(GridSettings, {"sparsities": [0.5, 0.9], "epochs": 3})
    assert grid_hash(magnitude) == "3bedd9a6"
    structured = make_settings(GridSettings, {"channel_ratios": [0.3, 0.5], "draw": ["10ep"],
                                              "early_bird": True, "channel_scope": "global", "epochs": 3})
    assert grid_hash(structured) == "6ae67410"
    # ... and every structured field is part of a structured grid's identity.
    for change in ({"criterion": "l1"}, {"channel_scope": "layer"}, {"draw": ("30ep",)},
                   {"early_bird": False}, {"channel_ratios": (0.3,)}, {"channel_round_to": 16}):
        assert grid_hash(dataclasses.replace(structured, **change)) != grid_hash(structured), change


def test_structured_tasks_one_per_draw_and_ratio_beside_magnitude_tasks():
    s = make_settings(GridSettings, {"sparsities": [0.5], "rewind": ["init"], "epochs": 2,
                                     "channel_ratios": [0.5, 0.3], "criterion": "fpgm",
                                     "draw": ["2ep", "1ep"], "early_bird": True, "exclude": ["logits"]})
    positions = {"init": 0.0, "1ep": 1.0, "2ep": 2.0, "early_bird": 1.5}
    tasks = build_tasks(s, positions, {"global-s5000": 0.5})
    structured = [t for t in tasks if t.kind == "structured"]
    assert len(tasks) == 1 + 3 * 2 and len(structured) == 6
    # Same cost (epochs): earliest checkpoint first, the Early-Bird ticket by its epoch.
    assert [t.rewind for t in tasks] == ["init", "1ep", "1ep", "early_bird", "early_bird", "2ep", "2ep"]
    t = next(t for t in structured if t.rewind == "early_bird" and t.ratio == 0.3)
    assert t.task_id == "structured-fpgm-layer-c3000-early_bird"
    assert t.mask_id == "channels-fpgm-layer-c3000-early_bird"
    assert (t.control, t.criterion, t.scope, t.epochs, t.cost, t.draw_epoch) == (
        "none", "fpgm", "layer", 2, 2.0, 1.5)
    assert t.exclude == ("logits",)
    assert len({x.seed for x in structured}) == 6


def test_cli_plan_prints_the_grid_directory(dense_run, capsys):
    from lottery.cli import main

    assert main(["plan", "--run", str(dense_run.root), "--sparsities", "0.8", "--rewind", "1ep"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    grid = GridPaths(out[-1])
    assert grid.root.parent == dense_run.root and load_plan(grid.root)["tasks"][0].rewind == "1ep"
    assert main(["plan", "--run", str(dense_run.root), "--sparsities", "0.8", "--rewind", "9ep"]) == 2
    assert "'9ep' is not a saved point" in capsys.readouterr().err


def test_cli_stats_prints_the_quantile_table_of_the_final_weights(dense_run, capsys):
    from lottery.cli import main

    assert main(["stats", "--run", str(dense_run.root)]) == 0
    out = capsys.readouterr().out
    assert f"prunable weights: {48 * 300 + 300 * 100 + 100 * 3:,}" in out
    assert "     99%" in out and "fc1/kernel" in out and "bias" not in out


def test_structured_plan_draws_channel_masks_at_each_checkpoint(dense_run):
    from lottery.prune.channel_masks import select_channels
    from lottery.prune.masks import load_mask
    from train.checkpoints import load_checkpoint

    settings = make_settings(GridSettings, {"sparsities": [0.5], "rewind": ["init"],
                                            "channel_ratios": [0.25, 0.5], "criterion": "l1",
                                            "draw": ["1ep", "6it"]})
    grid = plan(dense_run.root, settings)
    record = load_plan(grid.root)
    assert record["settings"]["channel_scope"] == "layer"   # resolved: l1 compares within a layer
    tasks = record["tasks"]
    assert sorted(t.kind for t in tasks) == ["oneshot"] + ["structured"] * 4
    for draw in ("1ep", "6it"):
        model = load_checkpoint(dense_run.root, draw)
        for ratio in (0.25, 0.5):
            (task,) = [t for t in tasks if t.kind == "structured" and t.rewind == draw
                       and t.ratio == ratio]
            mask, meta = load_mask(grid.mask(task.mask_id))
            want = select_channels(model, "l1", ratio, scope="layer")
            assert sorted(mask) == sorted(want)
            for name in want:
                np.testing.assert_array_equal(mask[name], want[name], err_msg=name)
            assert (meta["criterion"], meta["ratio"], meta["scope"], meta["draw"]) == ("l1", ratio, "layer", draw)
            assert meta["pruned_channels"] == want.meta["pruned_channels"] > 0
    # The two draw points really are different weights: at least one mask differs.
    a = load_mask(grid.mask("channels-l1-layer-c5000-1ep"))[0]
    b = load_mask(grid.mask("channels-l1-layer-c5000-6it"))[0]
    assert any(not np.array_equal(a[n], b[n]) for n in a)
    before = _files(grid.root)
    assert plan(dense_run.root, settings) == grid
    assert _files(grid.root) == before


def test_structured_plan_rounds_kept_channels_to_a_multiple(dense_run):
    from lottery.prune.masks import load_mask

    settings = make_settings(GridSettings, {"channel_ratios": [0.3], "criterion": "l2",
                                            "draw": ["1ep"], "channel_round_to": 8})
    grid = plan(dense_run.root, settings)
    (task,) = load_plan(grid.root)["tasks"]
    assert task.mask_id == "channels-l2-layer-c3000-r8-1ep" and task.round_to == 8
    mask, meta = load_mask(grid.mask(task.mask_id))
    assert meta["round_to"] == 8
    kept = {name: int(np.count_nonzero(entry)) for name, entry in mask.items() if name.endswith("bias")}
    assert kept and all(count % 8 == 0 for count in kept.values()), kept
    # LeNet's 300 and 100 hidden units, 30% pruned: 210 -> 208 and 70 -> 72 (nearest multiples of 8).
    assert sorted(kept.values()) == [72, 208]


@pytest.mark.parametrize("values, message", [
    ({"draw": ["1ep", "7ep"]}, r"draw: '7ep' is not a saved point .*saved: 1ep, 6it, final, init"),
    ({"draw": ["1ep"], "early_bird": True}, r"early_bird: .*early_bird.json does not exist: the dense "
                                            r"run .* was not trained with --early-bird"),
    ({"draw": ["1ep"], "criterion": "bn"}, r"criterion: checkpoint 1ep .*needs BatchNorm"),
    ({"draw": ["1ep"], "exclude": ["nothing*"]}, r"exclude: checkpoint 1ep .*'nothing\*' matches no layer"),
])
def test_structured_plan_errors_name_the_cause(dense_run, values, message):
    settings = make_settings(GridSettings, {"channel_ratios": [0.5], "criterion": "l2", **values})
    with pytest.raises(SettingsError, match=message):
        plan(dense_run.root, settings)


def test_early_bird_without_a_drawn_ticket_is_named(dense_run, tmp_path):
    import shutil

    run = DenseRunPaths(tmp_path / dense_run.root.name)
    shutil.copytree(dense_run.root, run.root)
    settings = make_settings(GridSettings, {"channel_ratios": [0.5], "criterion": "l1", "early_bird": True})
    write_json(run.early_bird, {"ratio": 0.5, "window": 5, "threshold": 0.1, "bn_layers": [],
                                "epochs": [{"epoch": 1, "distance": None, "window_max": None}],
                                "drawn_epoch": None, "checkpoint": None})
    with pytest.raises(SettingsError, match=r"early_bird.json: no Early-Bird ticket was drawn"):
        plan(run.root, settings)
    write_json(run.early_bird, {**read_json(run.early_bird), "drawn_epoch": 2, "checkpoint": "early_bird"})
    with pytest.raises(SettingsError, match=r"early_bird.json names checkpoint 'early_bird', but "
                                            r".*early_bird.weights.h5 is missing"):
        plan(run.root, settings)


def test_cli_plan_structured_flags(dense_run, capsys):
    from lottery.cli import main

    assert main(["plan", "--run", str(dense_run.root), "--channel-ratios", "0.5", "--criterion", "l1",
                 "--draw", "1ep"]) == 0
    grid = GridPaths(capsys.readouterr().out.strip().splitlines()[-1])
    (task,) = load_plan(grid.root)["tasks"]
    assert (task.kind, task.rewind, task.ratio, task.criterion) == ("structured", "1ep", 0.5, "l1")
    assert main(["plan", "--run", str(dense_run.root), "--channel-ratios", "0.5,1.2", "--draw", "1ep"]) == 2
    assert "--channel-ratios: 1.2 must lie strictly between 0 and 1" in capsys.readouterr().err
    assert main(["plan", "--run", str(dense_run.root), "--channel-ratios", "0.5", "--criterion", "l1",
                 "--early-bird"]) == 2
    assert "early_bird.json does not exist" in capsys.readouterr().err


def test_task_ids_are_pinned():
    # Pinned: ids name result, claim and mask files; a change orphans every existing grid's results.
    s = make_settings(GridSettings, {"sparsities": [0.9], "controls": "random_reinit,random_mask",
                                     "imp_rounds": 2, "imp_rate": 0.2, "epochs": 1, "channel_ratios": [0.3],
                                     "draw": ["1ep"], "channel_round_to": 16, "criterion": "l1", "seed": 4,
                                     "rewind": "init,6it"})
    random_twin = "global-s9000-random715520123"
    tasks = build_tasks(s, {"init": 0.0, "1ep": 1.0, "6it": 1.5}, {"global-s9000": 0.9, random_twin: 0.9})
    assert [(t.task_id, t.mask_id, t.seed) for t in tasks] == [
        ("imp-global-r2-p2000-init", None, 406176732),
        ("imp-global-r2-p2000-6it", None, 201750891),
        ("oneshot-global-s9000-init-none", "global-s9000", 1696298662),
        ("oneshot-global-s9000-init-random_mask", random_twin, 998855304),
        ("oneshot-global-s9000-init-random_reinit", "global-s9000", 1600651259),
        ("structured-l1-layer-c3000-r16-1ep", "channels-l1-layer-c3000-r16-1ep", 2024658476),
        ("oneshot-global-s9000-6it-none", "global-s9000", 2901369),
        ("oneshot-global-s9000-6it-random_mask", random_twin, 1621550446),
        ("oneshot-global-s9000-6it-random_reinit", "global-s9000", 1150086181),
    ]


def test_channel_ratios_that_would_share_an_id_are_refused_before_anything_is_written(dense_run):
    # 0.12345 and 0.1234 differ in their 4th decimal when rounded (0.1235, 0.1234), yet both are
    # tagged c1234 in ids: the settings or the plan refuse them, naming the field or the id.
    grids = sorted(dense_run.root.glob("lottery-*"))
    with pytest.raises(SettingsError, match=r"channel_ratios: .*(0\.12345|'channels-l1-layer-c1234-1ep')"):
        plan(dense_run.root, make_settings(GridSettings, {"channel_ratios": [0.12345, 0.1234],
                                                          "criterion": "l1", "draw": ["1ep"]}))
    assert sorted(dense_run.root.glob("lottery-*")) == grids


def test_plan_itself_refuses_values_that_would_share_an_id(dense_run):
    """Whatever the settings checked: two thresholds with one mask id are never planned."""
    settings = make_settings(GridSettings, {"sparsities": [0.5, 0.6], "epochs": 1})
    object.__setattr__(settings, "sparsities", (0.50004, 0.5))   # frozen: past the settings' own check
    grids = sorted(dense_run.root.glob("lottery-*"))
    with pytest.raises(SettingsError, match=r"sparsities: 0.50004 and 0.5 would share the id 'global-s5000'"):
        plan(dense_run.root, settings)
    assert sorted(dense_run.root.glob("lottery-*")) == grids


def test_lr_schedule_from_default_keeps_grid_names_and_fresh_is_recorded(dense_run):
    base = {"sparsities": [0.5, 0.9], "epochs": 3}
    default = make_settings(GridSettings, base)
    assert default.lr_schedule_from == "rewind"
    assert grid_hash(default) == "3bedd9a6"  # the pinned name of test_imp_only_grid_and_pinned_hash
    fresh = make_settings(GridSettings, {**base, "lr_schedule_from": "fresh"})
    assert grid_hash(fresh) != grid_hash(default)
    assert "lr_schedule_from" not in load_plan(plan(dense_run.root, default).root)["settings"]
    assert load_plan(plan(dense_run.root, fresh).root)["settings"]["lr_schedule_from"] == "fresh"
    with pytest.raises(SettingsError, match="lr_schedule_from"):
        make_settings(GridSettings, {**base, "lr_schedule_from": "restart"})


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_fresh_schedule_anneals_within_the_retraining_epochs(schedule):
    from lottery.points.recipe import retraining_lr
    from train.schedules import lr_at
    from train.settings import DenseSettings

    dense = DenseSettings(data="unused", model="lenet_300_100", epochs=30, lr=0.1,
                          lr_schedule=schedule, warmup_epochs=2,
                          lr_decay_epochs=(10, 20) if schedule == "step" else ())
    dense_rates = [lr_at(dense, e) for e in range(30)]
    fresh = [retraining_lr(dense, 3, 1.0, "fresh")(e) for e in range(3)]
    assert fresh[0] == dense_rates[0] and fresh[-1] == pytest.approx(dense_rates[-1])  # start to end
    assert fresh[1] > fresh[2]  # after the warm-up, down to the end
    rewind = [retraining_lr(dense, 3, 1.0, "rewind")(e) for e in range(3)]
    assert rewind == [lr_at(dense, e) for e in (1.0, 2.0, 3.0)]  # continued, far from annealed
    assert min(rewind) > 10 * dense_rates[-1]
    # As many epochs as the dense run: both replay the dense schedule exactly.
    assert [retraining_lr(dense, 30, 0.0, "fresh")(e) for e in range(30)] == pytest.approx(dense_rates)
    assert [retraining_lr(dense, 30, 0.0, "rewind")(e) for e in range(30)] == dense_rates


@pytest.mark.slow
def test_a_retrained_point_follows_the_chosen_schedule(digits_dir, tmp_path):
    """Real dense run (cosine, 3 epochs), real grid points retrained 2 epochs: `fresh` ends at the
    dense run's last rate, the default `rewind` stops at its second."""
    import csv

    from lottery.grid.scheduler import run_grid
    from train.run import train_dense
    from train.settings import DenseSettings

    run = train_dense(DenseSettings(data=str(digits_dir), model="lenet_300_100", out=str(tmp_path),
                                    epochs=3, batch_size=64, lr=0.05, lr_schedule="cosine",
                                    augment="none"))
    with open(run.history, newline="") as fh:
        dense_lr = [float(row["lr"]) for row in csv.DictReader(fh)]
    assert dense_lr[0] > dense_lr[1] > dense_lr[-1]
    for schedule, want in (("fresh", [dense_lr[0], dense_lr[-1]]), ("rewind", dense_lr[:2])):
        grid = plan(run.root, make_settings(GridSettings, {"sparsities": [0.5], "epochs": 2,
                                                           "lr_schedule_from": schedule}))
        assert len(run_grid(grid.root).executed) == 1
        (result_file,) = grid.results.glob("*.json")
        history = read_json(result_file)["result"]["history"]
        assert [row["lr"] for row in history] == pytest.approx(want, rel=1e-6), schedule
