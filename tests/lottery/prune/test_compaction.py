"""Compaction of every registered model: same function as the masked model, smaller, a plain Keras model."""
from __future__ import annotations

import functools

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lottery.prune.channel_masks import apply_structured, select_channels  # noqa: E402
from lottery.prune.compaction import compact, fold_batchnorm, model_cost, model_flops  # noqa: E402
from train.models import BATCHNORM_MODELS, MODELS, build_model  # noqa: E402

L = keras.layers

# Tiny versions of every registered model (input size, options).
TINY = {
    "mobilenet_v2": (16, {"alpha": 0.35}),
    "resnet20": (8, {"width": 4}),
    "resnet44": (8, {"width": 4}),
    "resnet56": (8, {"width": 2}),
    "lenet_300_100": (8, {}),
    "conv_small": (8, {"width": 0.125, "dense": 16}),
}
# (model, ratio, criterion, scope): two ratios per model, every criterion and scope at least once.
CASES = [
    ("mobilenet_v2", 0.3, "bn", "global"), ("mobilenet_v2", 0.6, "l1", "layer"),
    ("resnet20", 0.3, "bn", "global"), ("resnet20", 0.6, "l1", "layer"),
    ("resnet44", 0.3, "fpgm", "layer"), ("resnet44", 0.6, "bn", "layer"),
    ("resnet56", 0.3, "l2", "global"), ("resnet56", 0.6, "bn", "global"),
    ("lenet_300_100", 0.3, "l2", "layer"), ("lenet_300_100", 0.6, "fpgm", "global"),
    ("conv_small", 0.3, "l1", "global"), ("conv_small", 0.6, "fpgm", "layer"),
]


def test_every_registered_model_is_covered():
    assert set(TINY) == set(MODELS) == {c[0] for c in CASES}


@functools.lru_cache(maxsize=None)
def _model(name):
    """A tiny model with non-trivial BatchNorm statistics and affine parameters (built once)."""
    size, options = TINY[name]
    keras.utils.set_random_seed(0)
    model = build_model(name, 10, size, **options)
    rng = np.random.default_rng(0)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n))
            layer.beta.assign(rng.normal(0, 0.3, n))
            layer.moving_mean.assign(rng.normal(0, 0.3, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
    return model


def _images(model, n=4, seed=1):
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).uniform(0, 255, (n,) + shape).astype("float32")


def _outputs(model, x):
    """(probabilities, logits): logits make the comparison sharper than near-uniform probabilities."""
    probe = keras.Model(model.input, [model.output, model.get_layer("logits").output])
    probs, logits = probe(x, training=False)
    return np.asarray(probs), np.asarray(logits)


@pytest.mark.parametrize("name, ratio, criterion, scope", CASES)
def test_compacted_model_computes_what_the_masked_model_computes(name, ratio, criterion, scope):
    model = _model(name)
    x = _images(model)
    dense_probs, dense_logits = _outputs(model, x)
    mask = select_channels(model, criterion, ratio, scope=scope)
    small = compact(model, mask)
    weights = model.get_weights()
    try:
        apply_structured(model, mask)
        masked_probs, masked_logits = _outputs(model, x)
    finally:
        model.set_weights(weights)
    small_probs, small_logits = _outputs(small, x)
    # Pruning changed the function (so the equality below could fail) ...
    assert np.abs(masked_logits - dense_logits).max() > 1e-3
    # ... and the compacted model computes exactly the masked one.
    np.testing.assert_allclose(small_probs, masked_probs, atol=1e-4)
    scale = max(1.0, float(np.abs(masked_logits).max()))
    np.testing.assert_allclose(small_logits, masked_logits, atol=1e-4 * scale)
    before, after = model_cost(model), model_cost(small)
    assert after["params"] < before["params"] and after["flops"] < before["flops"]
    assert after["file_bytes"] < before["file_bytes"]
    assert small.count_params() == after["params"]
    np.testing.assert_allclose(_outputs(model, x)[1], dense_logits, rtol=0, atol=0)  # model untouched


@pytest.mark.parametrize("name", sorted(TINY))
def test_compacted_model_saves_loads_safely_and_trains(name, tmp_path):
    model = _model(name)
    small = compact(model, select_channels(model, "l1", 0.5))
    # Same layer names and nesting (a MobileNetV2 backbone stays one nested model).
    assert [(l.name, type(l)) for l in small.layers] == [(l.name, type(l)) for l in model.layers]
    x = _images(model, n=8, seed=2)
    expected = np.asarray(small(x, training=False))
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), expected, atol=1e-6)
    assert loaded.count_params() == small.count_params()
    # A plain Keras model: one ordinary fit step updates it, no masks involved.
    # Eager: tracing a 56-layer train step costs more than the step itself on these tiny sizes.
    loaded.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy",
                   run_eagerly=True)
    before = [w.copy() for w in loaded.get_weights()]
    history = loaded.fit(x, np.arange(8) % 10, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    assert any(not np.array_equal(b, a) for b, a in zip(before, loaded.get_weights()))


def test_compaction_refuses_element_wise_masks():
    model = _model("lenet_300_100")
    mask = dict(select_channels(model, "l1", 0.5))
    mask["fc2/kernel"] = np.random.default_rng(0).random((300, 100)) > 0.3
    with pytest.raises(ValueError, match="fc2/kernel"):
        compact(model, mask)


def test_unsupported_layers_stay_whole_and_the_rest_compacts():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3), name="x")
    a = L.Conv2D(6, 3, padding="same", activation="relu", name="a")(inp)
    b = L.Conv2D(6, 3, padding="same", name="b")(inp)
    y = L.Concatenate(name="cat")([a, b])                       # not followed: a, b stay whole
    y = L.Conv2D(8, 1, activation="relu", name="c")(y)
    y = L.MaxPooling2D(2, name="pool")(y)
    y = L.Conv2D(5, 1, name="d")(y)
    out = L.Dense(3, name="logits")(L.Flatten(name="flat")(y))
    model = keras.Model(inp, out)
    mask = select_channels(model, "l2", 0.5)
    small = compact(model, mask)
    assert small.get_layer("a").filters == 6 and small.get_layer("b").filters == 6
    assert small.get_layer("c").filters == 4 and small.get_layer("d").filters == 2
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    apply_structured(model, mask)
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(model(x)), atol=1e-5)


def test_layer_settings_such_as_the_bn_l1_penalty_survive_compaction():
    inp = keras.Input((4, 4, 3), name="x")
    y = L.Conv2D(6, 3, use_bias=False, name="c")(inp)
    y = L.BatchNormalization(gamma_regularizer=keras.regularizers.L1(1e-2), name="bn")(y)
    model = keras.Model(inp, L.Dense(2, name="logits")(L.GlobalAveragePooling2D(name="gap")(L.ReLU(name="r")(y))))
    model.get_layer("bn").gamma.assign(np.arange(1, 7, dtype="float32"))
    small = compact(model, select_channels(model, "bn", 0.5))
    assert small.get_layer("bn").gamma.shape == (3,)
    # The penalty is on the surviving scales only: 1e-2 * (4 + 5 + 6).
    np.testing.assert_allclose(float(sum(np.asarray(l) for l in small.losses)), 0.15, rtol=1e-5)


def test_model_cost_matches_a_hand_count(tmp_path):
    inp = keras.Input((6, 6, 2), name="x")
    y = L.Conv2D(4, 3, padding="same", name="conv")(inp)                   # 6*6 positions
    y = L.BatchNormalization(name="bn")(y)
    y = L.DepthwiseConv2D(3, strides=2, name="dw")(y)                        # valid: 2*2 positions
    y = L.Conv2D(3, 1, groups=1, name="pw")(y)
    out = L.Dense(5, name="logits")(L.Flatten(name="flat")(y))               # 2*2*3 = 12 inputs
    model = keras.Model(inp, out)
    cost = model_cost(model)
    assert cost["flops"] == 6 * 6 * 4 * (3 * 3 * 2) + 2 * 2 * 4 * (3 * 3) + 2 * 2 * 3 * 4 + 12 * 5
    assert cost["params"] == model.count_params() == ((3 * 3 * 2 * 4 + 4) + 4 * 4 + (9 * 4 + 4) + (4 * 3 + 3)
                                                      + (12 * 5 + 5))
    model.save(tmp_path / "m.keras")
    assert cost["file_bytes"] == (tmp_path / "m.keras").stat().st_size


def test_resnet20_flops_match_a_hand_count_of_the_cifar_network():
    model = build_model("resnet20", 10, 32)
    stem = 32 * 32 * 16 * (3 * 3 * 3)
    stage1 = 6 * 32 * 32 * 16 * (3 * 3 * 16)
    stage2 = 16 * 16 * 32 * (3 * 3 * 16) + 5 * 16 * 16 * 32 * (3 * 3 * 32) + 16 * 16 * 32 * 16   # + 1x1 proj
    stage3 = 8 * 8 * 64 * (3 * 3 * 32) + 5 * 8 * 8 * 64 * (3 * 3 * 64) + 8 * 8 * 64 * 32
    assert model_cost(model)["flops"] == stem + stage1 + stage2 + stage3 + 64 * 10   # ~40.8M as published


# ------------------------------------------------------------------------------- BatchNorm folding
def _batchnorms(model):
    return [l for l in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(l, L.BatchNormalization)]


def _assert_same_function(a, b, x):
    pa, la = _outputs(a, x)
    pb, lb = _outputs(b, x)
    np.testing.assert_allclose(pb, pa, atol=1e-4)
    np.testing.assert_allclose(lb, la, atol=1e-4 * max(1.0, float(np.abs(la).max())))


@pytest.mark.parametrize("name", sorted(BATCHNORM_MODELS))
def test_fold_batchnorm_keeps_the_function_of_dense_and_compacted_models(name, tmp_path):
    model = _model(name)
    assert _batchnorms(model)
    x = _images(model, n=4, seed=3)
    before = [w.copy() for w in model.get_weights()]
    small = compact(model, select_channels(model, "l1", 0.5, round_to=8))
    for original in (model, small):
        folded = fold_batchnorm(original)
        # Every BatchNorm of these models follows a convolution directly: all of them fold.
        assert not _batchnorms(folded)
        assert folded.count_params() < original.count_params()
        _assert_same_function(original, folded, x)
        assert model_flops(folded) == model_flops(original)   # biases are not counted
    for b, a in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)                                   # the original is untouched
    if name != "mobilenet_v2":   # saving is the same for every model: once, on the nested one
        return
    path = tmp_path / "folded.keras"
    folded.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), np.asarray(folded(x, training=False)),
                               atol=1e-6)


def test_fold_batchnorm_folds_only_what_it_safely_can():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3), name="x")
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    a = L.BatchNormalization(name="a_bn")(a)                        # folds (conv with bias)
    b = L.Conv2D(4, 1, activation="relu", name="b")(a)
    b = L.BatchNormalization(name="b_bn")(b)                        # after an activation: stays
    c = L.Conv2D(4, 1, use_bias=False, name="c")(b)
    side = L.ReLU(name="side")(c)                                   # c's output used twice: c_bn stays
    c = L.BatchNormalization(name="c_bn")(c)
    y = L.Add(name="add")([c, side])
    y = L.BatchNormalization(name="add_bn")(y)                      # after a merge: stays
    d = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(y)
    d = L.BatchNormalization(name="dw_bn", center=False)(d)         # folds (no beta)
    out = L.Dense(3, name="logits")(L.GlobalAveragePooling2D(name="gap")(d))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    for layer in _batchnorms(model):
        n = layer.moving_mean.shape[0]
        if layer.gamma is not None:
            layer.gamma.assign(rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0, 0.3, n))
        layer.moving_mean.assign(rng.normal(0, 0.3, n))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
    folded = fold_batchnorm(model)
    assert sorted(l.name for l in _batchnorms(folded)) == ["add_bn", "b_bn", "c_bn"]
    assert folded.get_layer("dw").use_bias and folded.get_layer("dw").bias is not None
    assert not folded.get_layer("c").use_bias
    x = rng.normal(size=(3, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(folded(x, training=False)), np.asarray(model(x, training=False)),
                               atol=1e-5)


def test_fold_batchnorm_refuses_models_it_cannot_follow():
    seq = keras.Sequential([keras.Input((4,)), L.Dense(3, name="h"), L.BatchNormalization(name="bn")])
    with pytest.raises(ValueError, match="functional"):
        fold_batchnorm(seq)
