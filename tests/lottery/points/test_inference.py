"""lottery.points.inference: throughput of Keras and LiteRT models; LiteRT exports compute what Keras does."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lottery.points.inference import LiteRTModel, inference_rate  # noqa: E402
from lottery.prune.channel_masks import select_channels  # noqa: E402
from lottery.prune.compaction import compact  # noqa: E402
from tests.lottery.prune.test_compaction import _model  # noqa: E402


def _pixels(model, batch, seed=1):
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).uniform(0, 255, (batch,) + shape).astype(np.float32)


def test_inference_rate_is_measured_for_keras_and_litert():
    model = _model("lenet_300_100")
    litert = LiteRTModel(model, batch_size=8)
    for arm in (model, litert):
        for stat in ("mean", "median"):
            for clock in ("wall", "cpu"):
                rate = inference_rate(arm, batch_size=8, seconds=0.1, stat=stat, clock=clock, threads=1)
                assert np.isfinite(rate) and rate > 0, (type(arm).__name__, stat, clock)
    with pytest.raises(ValueError, match="clock"):
        inference_rate(model, clock="gpu")
    with pytest.raises(ValueError, match="batch_size"):
        inference_rate(model, batch_size=0)
    with pytest.raises(ValueError, match="stat"):
        inference_rate(model, stat="mode")
    with pytest.raises(ValueError, match="converted for batch 8, not 4"):
        inference_rate(litert, batch_size=4)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet20"])
def test_litert_export_of_a_compacted_model_computes_what_keras_does(name, tmp_path):
    """The converter folds BatchNorm and fuses activations: the outputs must not change."""
    dense = _model(name)
    small = compact(dense, select_channels(dense, "l1", 0.5, scope="layer"))
    x = _pixels(small, 4)
    litert = LiteRTModel(small, batch_size=4)
    expected = np.asarray(small.predict_on_batch(x))
    got = litert.predict(x, threads=2)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # A different model gives different outputs: the comparison above can fail.
    other = LiteRTModel(dense, batch_size=4).predict(x)
    assert not np.allclose(other, expected, rtol=1e-4, atol=1e-5)
    saved = litert.save(tmp_path / "small.tflite")
    assert saved.read_bytes() == litert.flatbuffer
    with pytest.raises(ValueError, match="expected"):
        litert.predict(x[:3])
