"""lottery.prune.stats: which weights are prunable, and the magnitude table."""
from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lottery.prune.stats import (  # noqa: E402
    PERCENTS,
    format_stats_table,
    prunable_weights,
    weight_stats,
    write_stats,
)


def _conv_model():
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.SeparableConv2D(5, 1, name="sep")(x)
    x = keras.layers.Conv2DTranspose(2, 1, name="up")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, x, name="small")


def test_prunable_weights_are_the_kernels_only():
    keras.utils.set_random_seed(1)
    model = _conv_model()
    weights = prunable_weights(model)
    assert sorted(weights) == sorted([
        "conv1/kernel", "dw/kernel", "sep/depthwise_kernel", "sep/pointwise_kernel", "up/kernel",
        "logits/kernel"])
    by_path = {v.path: v for v in model.weights}
    for name, value in weights.items():
        np.testing.assert_array_equal(value, by_path[name].numpy())
    # Copies: changing the model afterwards does not change what was read.
    by_path["conv1/kernel"].assign(np.zeros(by_path["conv1/kernel"].shape))
    assert np.count_nonzero(weights["conv1/kernel"]) > 0


def test_nested_models_are_walked():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="a")], name="inner")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="b")(inner(inputs)))
    assert sorted(prunable_weights(model)) == ["b/kernel", "inner/a/kernel"]


def test_model_without_kernels_is_an_error():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn")], name="bn_only")
    with pytest.raises(ValueError, match="no prunable"):
        prunable_weights(model)


def test_weight_stats_quantiles_and_counts(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 20)).astype(np.float32)
    b = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
    b[0] = 0.0
    stats = weight_stats({"m/a/kernel": a, "m/b/kernel": b})
    every = np.abs(np.concatenate([a.ravel(), b.ravel()]).astype(np.float64))
    assert [row["percent"] for row in stats["quantiles"]] == list(range(0, 90, 10)) + list(range(90, 100))
    assert list(PERCENTS)[-10:] == list(range(90, 100))
    for row in stats["quantiles"]:
        assert row["magnitude"] == pytest.approx(np.percentile(every, row["percent"]))
    assert stats["count"] == a.size + b.size
    assert stats["nonzero"] == a.size + b.size - 4 * 8 * 3
    assert stats["layers"]["m/b/kernel"]["count"] == b.size
    assert stats["layers"]["m/b/kernel"]["nonzero"] == b.size - 96
    assert stats["layers"]["m/a/kernel"]["shape"] == [30, 20]
    assert stats["max_magnitude"] == pytest.approx(every.max())

    table = format_stats_table(stats)
    assert "m/a/kernel" in table and "m/b/kernel" in table
    assert " 99%" in table and " 95%" in table
    write_stats(tmp_path / "stats.json", stats)
    assert json.loads((tmp_path / "stats.json").read_text()) == json.loads(json.dumps(stats))
