"""A grid point's top-5 accuracy, BatchNorm recalibration after masking and chance check, and the
report's top-1/top-5 table built from such results."""
from __future__ import annotations

import numpy as np
import pytest

from lottery.points.recipe import Recipe, retrain
from lottery.prune.stats import prunable_variables
from lottery.report.metrics_table import metrics_table
from lottery.report.results import result_row

keras = pytest.importorskip("keras")


def _data(classes: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, 8)) * 2
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, 8))).astype(np.float32), y.astype(np.int32)


def _model(classes: int):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8,))
    x = keras.layers.Dense(32, name="fc1")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.999, name="bn")(x)   # stale after 2 epochs
    x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax", name="out")(x))


def _point(classes: int):
    model = _model(classes)
    fc1 = prunable_variables(model)
    mask = {name: np.random.default_rng(0).random(tuple(v.shape)) > 0.5 for name, v in fc1.items()}
    val = _data(classes, 300, 1)
    recipe = Recipe(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                    epochs=2, train_data=_data(classes, 600, 0), validation_data=val,
                    batch_size=50, num_classes=classes)
    return model, val, retrain(model, mask, recipe, label="test point")


def test_point_records_top5_after_recalibrating_its_masked_batchnorm():
    model, (xv, yv), result = _point(10)
    probs = model.predict(xv, verbose=0)
    top5 = float(np.mean(np.any(np.argsort(-probs, axis=1)[:, :5] == yv[:, None], axis=1)))
    top1 = float(np.mean(np.argmax(probs, axis=1) == yv))
    # The reported metrics are those of the final (recalibrated) model.
    assert result["bn_recalibrated"] is True and result["bn_recalibration_batches"] == 12
    assert result["accuracy"] == pytest.approx(top1, abs=1e-6)
    assert result["top5_accuracy"] == pytest.approx(top5, abs=1e-6)
    assert result["best_top5_accuracy"] >= result["top5_accuracy"] >= result["accuracy"]
    assert result["accuracy_before_bn_recalibration"] == result["history"][-1]["val_accuracy"]
    assert result["best_accuracy"] >= result["accuracy"]
    assert result["val_at_chance"] is False and result["chance_warning"] is None
    # The recalibrated statistics are those of the layer inputs over the first 12 batches.
    bn = model.get_layer("bn")
    inputs = model.get_layer("fc1")(_data(10, 600, 0)[0]).numpy()
    np.testing.assert_allclose(bn.moving_mean.numpy(), inputs.mean(axis=0), rtol=1e-3, atol=1e-4)

    rows = [result_row({"task_id": f"t{i}", "task": {"kind": "oneshot", "rewind": "init",
                                                      "control": "none", "sparsity": 0.5},
                        "result": result}) for i in range(2)]
    assert rows[0]["top5_accuracy"] == result["top5_accuracy"] and rows[0]["bn_recalibrated"] == 1.0
    table = metrics_table(rows, classes=10)
    assert f"{result['top5_accuracy']:.4f}" in table and f"{result['accuracy']:.4f}" in table
    assert f"yes ({result['accuracy_before_bn_recalibration']:.4f})" in table


def test_three_classes_have_no_top5_and_the_table_says_na():
    _, _, result = _point(3)
    assert "top5_accuracy" not in result and "best_top5_accuracy" not in result
    row = result_row({"task_id": "t", "task": {"kind": "oneshot", "rewind": "init",
                                               "control": "none", "sparsity": 0.5},
                      "result": result})
    assert row["top5_accuracy"] is None
    assert "| n/a | n/a |" in metrics_table([row], classes=3)
