"""The super-model presets (common.presets: super-resnet20, super-resnet44): the dense recipe with its
gradual-pruning schedule, and the quantisation stage `bigticket quantize --preset` reads."""
from __future__ import annotations

import argparse

import pytest

from common.presets import PRESETS, preset
from common.settings import make_settings


@pytest.mark.parametrize("name, model, final", [("super-resnet20", "resnet20", 0.6),
                                                ("super-resnet44", "resnet44", 0.7)])
def test_super_model_preset_is_the_cifar_recipe_with_a_polynomial_schedule(tmp_path, name, model, final):
    from train.gmp_schedule import schedule_from_settings
    from train.schedules import lr_at
    from train.settings import DenseSettings

    s = make_settings(DenseSettings, {**preset(name, "dense"), "data": str(tmp_path)})
    assert (s.model, s.epochs, s.batch_size, s.optimizer, s.momentum) == (model, 160, 128, "sgd", 0.9)
    assert [lr_at(s, e) for e in (0, 80, 120)] == pytest.approx([0.1, 0.01, 0.001])
    assert (s.gmp_schedule, s.gmp_initial_sparsity, s.gmp_final_sparsity) == ("polynomial", 0.0, final)
    assert (s.gmp_power, s.gmp_frequency, s.gmp_scope, s.mixed_precision) == (3.0, 100, "global", False)
    # CIFAR-10 at batch 128: 391 steps per epoch; the schedule ends at the last step, exactly final.
    schedule = schedule_from_settings(s, total_steps=160 * 391)
    assert schedule.sparsity(0) == 0.0 and schedule.sparsity(160 * 391) == pytest.approx(final, abs=1e-12)
    assert schedule.update_steps()[-1] == 160 * 391
    # Mixed precision stays optional: a flag away, and the settings still validate.
    assert make_settings(DenseSettings, {**preset(name, "dense"), "data": str(tmp_path),
                                         "mixed_precision": True}).mixed_precision


def test_quantize_stage_of_the_presets():
    from deploy import cli
    from deploy.litert import VARIANTS

    parser = argparse.ArgumentParser(prog="bigticket quantize")
    cli.add_arguments(parser)
    chosen = cli._options(parser.parse_args(["--preset", "super-resnet20"])).variants
    assert "full_int8" in chosen and "float32" in chosen
    assert cli._options(parser.parse_args(["--preset", "super-resnet44", "--variants", "float16"])
                        ).variants == ("float16",)
    # A preset without a quantisation stage, or none: every variant.
    assert cli._options(parser.parse_args(["--preset", "early-bird-resnet20"])).variants == VARIANTS
    assert preset("early-bird-resnet20", "quantize") == {} and "quantize" not in PRESETS["early-bird-resnet20"]


def test_an_unknown_preset_on_quantize_is_named(capsys):
    from bigticket.cli import main

    assert main(["quantize", "--run", "nowhere", "--preset", "super-resnet32"]) == 2
    assert "--preset: unknown preset 'super-resnet32'" in capsys.readouterr().err
