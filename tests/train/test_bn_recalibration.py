"""BatchNorm recalibration, the run-length BatchNorm momentum and the chance-level warning."""
from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from train.bn_recalibration import bn_layers, dense_policy, recalibrate
from train.chance_check import at_chance, point_fields, tolerance
from train.data import make_dataset
from train.models import auto_bn_momentum, resolve_bn_momentum
from train.run import train_dense
from train.settings import DenseSettings


def _bn_model(nested: bool):
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, name="fc")(inputs)
    if nested:  # BN inside a sub-model, as in Keras' MobileNetV2
        inner_in = keras.Input((5,))
        inner = keras.Model(inner_in, keras.layers.BatchNormalization(momentum=0.99)(inner_in))
        normed = inner(hidden)
    else:
        normed = keras.layers.BatchNormalization(momentum=0.99, name="bn")(hidden)
    out = keras.layers.Dense(3, activation="softmax")(normed)
    return keras.Model(inputs, out)


@pytest.mark.parametrize("nested", [False, True])
def test_recalibration_sets_the_exact_mean_and_variance_of_the_layer_inputs(nested):
    model = _bn_model(nested)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(96, 6)) * 3 + 2).astype(np.float32)
    (layer,) = bn_layers(model)
    layer.moving_mean.assign(np.full(5, 7.0, np.float32))     # stale statistics
    layer.moving_variance.assign(np.full(5, 0.01, np.float32))
    used = recalibrate(model, [(x[i:i + 32], None) for i in range(0, 96, 32)], max_batches=10)
    assert used == 3
    inputs = model.get_layer("fc")(x).numpy().astype(np.float64)   # what the BN layer sees
    np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(axis=0), rtol=1e-4, atol=1e-5)
    # The pooled variance over all 96 inputs, not the mean of the three batch variances.
    np.testing.assert_allclose(layer.moving_variance.numpy(), inputs.var(axis=0), rtol=1e-4)
    assert not np.allclose(layer.moving_variance.numpy(),
                           np.mean([inputs[i:i + 32].var(axis=0) for i in (0, 32, 64)], axis=0))
    assert layer.momentum == 0.99   # restored
    # max_batches is honoured: one batch gives that batch's own moments
    recalibrate(model, [(x[:32], None), (x[32:64], None)], max_batches=1)
    np.testing.assert_allclose(layer.moving_mean.numpy(), inputs[:32].mean(axis=0), rtol=1e-4, atol=1e-5)


def test_bn_momentum_fits_the_epoch_length_and_keeps_todays_default_on_long_epochs():
    assert [auto_bn_momentum(n) for n in (12, 39, 40, 199, 200, 5000)] == [0.9, 0.9, 0.95, 0.95,
                                                                         0.99, 0.99]
    # Long epochs keep today's options (so today's identity hash); short ones get the auto value.
    assert resolve_bn_momentum("resnet20", {"width": 4}, 390) == ({"width": 4}, 0.99)
    assert resolve_bn_momentum("resnet20", {"width": 4}, 23) == ({"width": 4, "bn_momentum": 0.9}, 0.9)
    # A momentum the user set is kept; models without the option are left alone.
    assert resolve_bn_momentum("mobilenet_v2", {"bn_momentum": 0.999}, 12)[1] == 0.999
    assert resolve_bn_momentum("lenet_300_100", {}, 12) == ({}, None)


def test_auto_policy_recalibrates_where_statistics_are_stale():
    def s(**kw):
        return DenseSettings(data="/d", model=kw.pop("model", "resnet20"), **kw)

    assert dense_policy(s(engine="elephas", workers=2), 500)[0]
    assert dense_policy(s(model_options={"bn_momentum": 0.99}), 23)[0]      # window 100 > 23/2
    assert not dense_policy(s(model_options={"bn_momentum": 0.9}), 23)[0]   # window 10 fits
    assert not dense_policy(s(engine="elephas", workers=2, bn_recalibration="off"), 5)[0]
    assert not dense_policy(s(model="lenet_300_100"), 5)[0]
    assert dense_policy(s(bn_recalibration="on", model_options={"bn_momentum": 0.5}), 500)[0]
    with pytest.raises(ValueError, match="bn_recalibration"):
        s(model="lenet_300_100", bn_recalibration="on")


def test_chance_band_follows_the_validation_size():
    assert tolerance(10, 359) == pytest.approx(3 * np.sqrt(0.09 / 359) + 0.01)
    assert at_chance(0.1003, 0.61, 10, 359) and at_chance(0.13, 0.5, 10, 359)
    assert not at_chance(0.1003, 0.18, 10, 359)      # training is not well above chance
    assert not at_chance(0.30, 0.61, 10, 359)        # validation is above chance
    assert not at_chance(0.13, 0.9, 10, 100_000)     # a large split resolves 3 points
    # A grid point's fields: the warning names the cause it can see.
    flagged = point_fields(0.1, 0.8, 10, 359, has_batchnorm=True, recalibrated=False)
    assert flagged["val_at_chance"] and "pruning mask" in flagged["chance_warning"]
    no_bn = point_fields(0.1, 0.8, 10, 359, has_batchnorm=False, recalibrated=False)
    assert "mismatch" in no_bn["chance_warning"]
    assert point_fields(0.7, 0.8, 10, 359, has_batchnorm=True, recalibrated=True) == {
        "val_at_chance": False, "chance_warning": None}


@pytest.mark.slow
def test_stale_statistics_warn_at_chance_and_recalibration_restores_validation(
        digits_dir, digits, tmp_path, caplog):
    """A short BatchNorm run whose moving statistics cannot converge (momentum 0.999 over ~46
    steps): validation sits at chance, the history flags it and the log names the cause;
    recalibrating the final model on 20 training batches restores validation accuracy."""
    import keras

    settings = DenseSettings(data=str(digits_dir), out=str(tmp_path), model="resnet20",
                             model_options={"width": 4, "bn_momentum": 0.999}, epochs=2,
                             optimizer="adam", lr=0.01, augment="none", bn_recalibration="off")
    with caplog.at_level(logging.WARNING, logger="train.chance_check"):
        run = train_dense(settings)
    rows = list(csv.DictReader(run.history.open()))
    last = rows[-1]
    assert float(last["accuracy"]) > 0.4
    assert float(last["val_at_chance"]) == 1.0 and last["bn_recalibrated"] == ""
    assert any("at chance" in r.message and "stale BatchNorm" in r.message and "0.999" in r.message
               for r in caplog.records)

    model = keras.saving.load_model(str(run.model), safe_mode=True)
    val = make_dataset(digits, "validation", batch_size=64, training=False, input_size=16)
    before = model.evaluate(val, verbose=0, return_dict=True)
    train = make_dataset(digits, "train", batch_size=64, training=True, input_size=16, seed=0,
                         epoch=1, augment="none")
    recalibrate(model, train, 20)
    after = model.evaluate(val, verbose=0, return_dict=True)
    assert before["accuracy"] == pytest.approx(float(last["val_accuracy"]), abs=1e-6)
    assert after["accuracy"] >= before["accuracy"] + 0.3, (before, after)
    assert not at_chance(after["accuracy"], float(last["accuracy"]), 10, digits.records["validation"])
