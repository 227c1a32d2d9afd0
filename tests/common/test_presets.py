"""common.presets and `--preset` on `bigticket lottery plan`."""
from __future__ import annotations

import numpy as np
import pytest

from common.atomic import read_json, write_json
from common.paths import DenseRunPaths, GridPaths
from common.presets import PRESETS, preset
from common.settings import make_settings
from lottery.grid.plan import load_plan
from lottery.grid.settings import GridSettings

NAME = "early-bird-resnet20"


def test_unknown_preset_and_stage_are_named():
    with pytest.raises(ValueError, match="unknown preset 'resnet-20'.*early-bird-resnet20"):
        preset("resnet-20", "grid")
    with pytest.raises(ValueError, match=f"preset '{NAME}': stage must be one of"):
        preset(NAME, "etl")


def test_preset_is_a_fresh_copy():
    grid = preset(NAME, "grid")
    grid["draw"].append("1ep")
    assert "1ep" not in PRESETS[NAME]["grid"]["draw"]


def test_grid_preset_is_the_early_bird_grid():
    s = make_settings(GridSettings, preset(NAME, "grid"))
    assert s.channel_ratios == (0.3, 0.5) and s.criterion == "bn"
    assert s.draw_points == ("10ep", "30ep", "50ep", "100ep", "early_bird")
    assert s.resolved_channel_scope == "global"


def test_dense_preset_is_the_early_bird_recipe(tmp_path):
    from train.schedules import lr_at
    from train.settings import DenseSettings

    s = make_settings(DenseSettings, {**preset(NAME, "dense"), "data": str(tmp_path)})
    assert (s.model, s.epochs, s.early_bird, s.bn_l1) == ("resnet20", 160, True, 1e-4)
    assert s.rewind == ("10ep", "30ep", "50ep", "100ep")
    # Step schedule: 0.1, divided by 10 at epochs 80 and 120.
    assert [lr_at(s, e) for e in (0, 79, 80, 119, 120, 159)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A finished 160-epoch ResNet-20 run laid out as the dense stage writes it, with the preset's
    checkpoints (real Keras weights, drifting as training would) and a drawn Early-Bird ticket."""
    import keras

    from train.checkpoints import save_checkpoint
    from train.models import build_model

    run = DenseRunPaths(tmp_path_factory.mktemp("runs") / "dense-5eed0001")
    keras.utils.set_random_seed(0)
    model = build_model("resnet20", 10, 8, width=4)
    rng = np.random.default_rng(0)
    for name in ("init", "10ep", "early_bird", "30ep", "50ep", "100ep", "final"):
        model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in model.get_weights()])
        save_checkpoint(model, run, name)
    write_json(run.settings, {"settings": {"model": "resnet20", "input_size": 8,
                                           "model_options": {"width": 4}, "epochs": 160,
                                           "rewind": ["10ep", "30ep", "50ep", "100ep"], "data": "unused"},
                              "num_classes": 10, "steps_per_epoch": 20})
    write_json(run.early_bird, {"ratio": 0.5, "window": 5, "threshold": 0.1, "bn_layers": [],
                                "epochs": [{"epoch": e, "distance": None, "window_max": None}
                                           for e in range(1, 161)],
                                "drawn_epoch": 22, "checkpoint": "early_bird"})
    run.success.write_text("")
    return run


def test_plan_with_the_preset_plans_the_early_bird_grid(resnet_run, capsys):
    from lottery.cli import main

    assert main(["plan", "--run", str(resnet_run.root), "--preset", NAME]) == 0
    grid = GridPaths(capsys.readouterr().out.strip().splitlines()[-1])
    record = load_plan(grid.root)
    assert record["settings"]["draw"] == ["10ep", "30ep", "50ep", "100ep"]
    assert record["settings"]["early_bird"] is True and record["settings"]["epochs"] == 160
    tasks = record["tasks"]
    assert sorted((t.rewind, t.ratio) for t in tasks) == sorted(
        (d, r) for d in ("10ep", "30ep", "50ep", "100ep", "early_bird") for r in (0.3, 0.5))
    assert {t.kind for t in tasks} == {"structured"} and {t.criterion for t in tasks} == {"bn"}
    eb = [t for t in tasks if t.rewind == "early_bird"]
    assert {t.draw_epoch for t in eb} == {22.0}
    for t in tasks:
        assert grid.mask(t.mask_id).is_file()
    # Flags override the preset: one ratio, one draw point, no Early-Bird draw, another criterion.
    assert main(["plan", "--run", str(resnet_run.root), "--preset", NAME, "--channel-ratios", "0.5",
                 "--draw", "30ep", "--no-early-bird", "--criterion", "l1"]) == 0
    other = GridPaths(capsys.readouterr().out.strip().splitlines()[-1])
    assert other.root != grid.root
    (task,) = load_plan(other.root)["tasks"]
    assert (task.rewind, task.ratio, task.criterion, task.scope) == ("30ep", 0.5, "l1", "layer")
    assert read_json(other.settings)["settings"]["early_bird"] is False


def test_unknown_preset_on_the_command_line_is_named(resnet_run, capsys):
    from lottery.cli import main

    assert main(["plan", "--run", str(resnet_run.root), "--preset", "nope"]) == 2
    assert "--preset: unknown preset 'nope'" in capsys.readouterr().err
