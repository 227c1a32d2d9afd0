"""The model registry: real Keras models, built, saved and loaded with safe_mode."""
from __future__ import annotations

import numpy as np
import pytest

from train.models import MODELS, build_model

SMALL = {  # options that keep each architecture quick to build in a test
    "mobilenet_v2": {"alpha": 0.35},
    "resnet20": {"width": 4},
    "resnet44": {"width": 4},
    "resnet56": {"width": 4},
    "lenet_300_100": {},
    "conv_small": {"blocks": 1, "width": 0.125, "dense": 16},
}


def test_every_registered_model_is_tested_here():
    assert set(MODELS) == set(SMALL)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet20", "lenet_300_100", "conv_small"])
def test_builds_deterministically_and_round_trips_with_safe_mode(name, tmp_path):
    import keras

    keras.utils.set_random_seed(7)
    model = build_model(name, 10, 16, **SMALL[name])
    keras.utils.set_random_seed(7)
    again = build_model(name, 10, 16, **SMALL[name])
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)

    def layer_types(m):
        for layer in m.layers:
            yield type(layer).__name__
            if isinstance(layer, keras.Model):
                yield from layer_types(layer)

    assert "Lambda" not in set(layer_types(model))
    x = np.random.default_rng(0).uniform(0, 255, size=(3, 16, 16, 3)).astype("float32")
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), probs, rtol=1e-5, atol=1e-6)


def test_the_seed_decides_the_initial_weights():
    import keras

    keras.utils.set_random_seed(7)
    a = build_model("conv_small", 10, 16, **SMALL["conv_small"])
    keras.utils.set_random_seed(8)
    b = build_model("conv_small", 10, 16, **SMALL["conv_small"])
    assert any(not np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


@pytest.mark.parametrize("depth, low, high", [(20, 0.27e6, 0.28e6), (44, 0.66e6, 0.67e6),
                                             (56, 0.85e6, 0.87e6)])
def test_cifar_resnets_follow_he_et_al(depth, low, high):
    # Option-B ResNets on CIFAR: the paper's 0.27M / 0.66M / 0.85M weights plus two 1x1
    # projections (and their batch norms).
    model = build_model(f"resnet{depth}", 10, 32)
    assert low < model.count_params() < high
    convs = [l for l in model.layers if type(l).__name__ == "Conv2D" and l.kernel_size == (3, 3)]
    assert len(convs) == depth - 1  # stem + 3 stages x n blocks x 2; the dense layer makes depth
    assert sorted({c.filters for c in convs}) == [16, 32, 64]
    assert sum(c.strides == (2, 2) for c in convs) == 2
    assert model.output_shape == (None, 10)


def test_mobilenet_upsamples_small_inputs_and_keeps_large_ones():
    small = build_model("mobilenet_v2", 4, 8, alpha=0.35)
    assert any(type(l).__name__ == "Resizing" for l in small.layers)
    assert small.input_shape == (None, 8, 8, 3)
    large = build_model("mobilenet_v2", 4, 48, alpha=0.35)
    assert not any(type(l).__name__ == "Resizing" for l in large.layers)


def test_mobilenet_batch_norm_momentum_is_an_option_and_is_saved(tmp_path):
    import keras

    def momenta(model):
        backbone = next(l for l in model.layers if isinstance(l, keras.Model))
        return {l.momentum for l in backbone.layers
                if isinstance(l, keras.layers.BatchNormalization)}

    assert momenta(build_model("mobilenet_v2", 4, 32, alpha=0.35)) == {0.99}
    model = build_model("mobilenet_v2", 4, 32, alpha=0.35, bn_momentum=0.9)
    assert momenta(model) == {0.9}
    model.save(tmp_path / "m.keras")
    assert momenta(keras.models.load_model(tmp_path / "m.keras", safe_mode=True)) == {0.9}
    with pytest.raises(ValueError, match="bn_momentum"):
        build_model("mobilenet_v2", 4, 32, bn_momentum=1.5)


def test_unknown_model_and_options_are_named():
    with pytest.raises(ValueError, match="known models: conv_small, lenet_300_100, mobilenet_v2"):
        build_model("vgg16", 10, 32)
    with pytest.raises(ValueError, match=r"model_options: \['depth'\] not accepted by model 'resnet20'"):
        build_model("resnet20", 10, 32, depth=3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("lenet_300_100", 1, 32)
