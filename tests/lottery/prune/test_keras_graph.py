"""lottery.prune.keras_graph, the seam to Keras internals: each function on real tiny models.

When a Keras upgrade moves a private attribute or class the pruning code relies on, these tests
are the ones that should fail, and name the function to fix.
"""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lottery.prune import keras_graph  # noqa: E402
from train.models import build_model  # noqa: E402

L = keras.layers


def _sequential():
    return keras.Sequential([keras.Input((6,)), L.Dense(4, name="s_fc1"), L.Dense(2, name="s_fc2")],
                            name="seq")


def _inner():
    x = keras.Input((8, 8, 3), name="inner_in")
    y = L.Conv2D(4, 3, padding="same", name="inner_conv")(x)
    y = L.BatchNormalization(name="inner_bn")(y)
    return keras.Model(x, L.ReLU(name="inner_relu")(y), name="inner")


def _nested():
    """A functional model with a nested functional backbone and a shared (twice-called) layer."""
    x = keras.Input((8, 8, 3), name="pixels")
    y = _inner()(x)
    shared = L.Conv2D(4, 1, name="shared")
    y = shared(shared(y))
    y = L.GlobalAveragePooling2D(name="gap")(y)
    return keras.Model(x, L.Dense(3, name="logits")(y), name="outer")


def _depthwise_block():
    """A MobileNetV2-style inverted residual: expand, depthwise, project, add."""
    x = keras.Input((8, 8, 4), name="x")
    y = L.Conv2D(8, 1, use_bias=False, name="expand")(x)
    y = L.BatchNormalization(name="expand_bn")(y)
    y = L.ReLU(6.0, name="expand_relu")(y)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(y)
    y = L.BatchNormalization(name="dw_bn")(y)
    y = L.ReLU(6.0, name="dw_relu")(y)
    y = L.Conv2D(4, 1, use_bias=False, name="project")(y)
    y = L.BatchNormalization(name="project_bn")(y)
    return keras.Model(x, L.Add(name="add")([x, y]), name="block")


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.fc = L.Dense(2, name="fc")

    def call(self, x):
        return self.fc(x)


def test_prunable_layer_types_cover_every_convolution_family_and_dense():
    types = keras_graph.prunable_layer_types()
    prunable = [L.Dense(2), L.EinsumDense("ab,bc->ac", output_shape=2), L.Conv1D(2, 3), L.Conv2D(2, 3),
                L.Conv3D(2, 3), L.Conv2DTranspose(2, 3), L.DepthwiseConv2D(3), L.SeparableConv2D(2, 3)]
    assert all(isinstance(layer, types) for layer in prunable)
    assert not any(isinstance(layer, types) for layer in (L.BatchNormalization(), L.Embedding(5, 2),
                                                          L.ReLU(), L.Add()))


def test_conv_types_tell_the_convolution_families_apart():
    conv = keras_graph.conv_types()
    assert isinstance(L.Conv2D(2, 3), conv.conv) and isinstance(L.Conv1D(2, 3), conv.conv)
    assert isinstance(L.Conv2DTranspose(2, 3), conv.transpose)
    assert isinstance(L.DepthwiseConv2D(3), conv.depthwise)
    assert isinstance(L.SeparableConv2D(2, 3), conv.separable)
    assert not isinstance(L.DepthwiseConv2D(3), (conv.conv, conv.separable))
    assert not isinstance(L.Dense(2), tuple(conv))


def test_all_layers_descends_into_nested_models_but_leaves_the_model_out():
    names = [layer.name for layer in keras_graph.all_layers(_nested())]
    assert "outer" not in names and "inner" in names
    assert {"inner_conv", "inner_bn", "inner_relu", "shared", "logits"} <= set(names)
    assert names.count("shared") == 1  # a shared layer is one layer
    seq = [layer.name for layer in keras_graph.all_layers(_sequential())]
    assert "seq" not in seq and seq[-2:] == ["s_fc1", "s_fc2"]  # after Sequential's own InputLayer


def test_optimizer_variables_are_those_it_was_built_for():
    model = _nested()
    optimizer = keras.optimizers.SGD(momentum=0.9)
    optimizer.build(model.trainable_variables)
    assert [v.path for v in keras_graph.optimizer_variables(optimizer)] == \
        [v.path for v in model.trainable_variables]


def test_is_functional_only_for_functional_graphs():
    assert keras_graph.is_functional(_nested()) and keras_graph.is_functional(_inner())
    assert not keras_graph.is_functional(_sequential())
    assert not keras_graph.is_functional(_Subclassed())
    assert not keras_graph.is_functional(L.Dense(2))


def test_flatten_gives_the_tensors_of_a_structure():
    x = keras.Input((4,), name="a")
    two = keras.Model(x, [L.Dense(2, name="p")(x), L.Dense(3, name="q")(x)], name="two")
    flat = keras_graph.flatten(two.outputs)
    assert [t.shape[-1] for t in flat] == [2, 3]
    assert keras_graph.flatten({"b": 2, "a": [1]}) == [1, 2]  # dict entries in key order


def test_calls_are_in_execution_order_with_their_tensors():
    model = _nested()
    calls = list(keras_graph.calls(model))
    assert [c.layer.name for c in calls] == ["inner", "shared", "shared", "gap", "logits"]
    assert calls[0].inputs[0] is model.inputs[0]
    assert calls[-1].outputs[0] is model.outputs[0]
    assert calls[2].inputs[0] is calls[1].outputs[0]  # the shared layer's second call reads its first
    layer, inputs, outputs = calls[3]  # unpacks as (layer, inputs, outputs)
    assert layer.name == "gap" and tuple(outputs[0].shape) == (None, 4)


def test_walk_calls_inlines_nested_models():
    names = [c.layer.name for c in keras_graph.walk_calls(_nested())]
    assert names == ["inner_conv", "inner_bn", "inner_relu", "shared", "shared", "gap", "logits"]
    block = [c.layer.name for c in keras_graph.walk_calls(_depthwise_block())]
    assert block == ["expand", "expand_bn", "expand_relu", "dw", "dw_bn", "dw_relu", "project",
                     "project_bn", "add"]
    add = list(keras_graph.walk_calls(_depthwise_block()))[-1]
    assert len(add.inputs) == 2


def test_walk_calls_through_keras_mobilenet_v2():
    model = build_model("mobilenet_v2", 10, 16, alpha=0.35)
    calls = list(keras_graph.walk_calls(model))
    kinds = {type(c.layer).__name__ for c in calls}
    assert {"DepthwiseConv2D", "Conv2D", "BatchNormalization", "ReLU", "Add", "Dense"} <= kinds
    assert not any(keras_graph.is_functional(c.layer) for c in calls)
    # The backbone's calls, in its own order, stand where the backbone's call stood.
    outer = [c.layer.name for c in keras_graph.calls(model)]
    backbone = next(c.layer for c in keras_graph.calls(model) if keras_graph.is_functional(c.layer))
    at = outer.index(backbone.name)
    inner = [c.layer.name for c in keras_graph.calls(backbone)]
    assert [c.layer.name for c in calls] == outer[:at] + inner + outer[at + 1:]
    assert calls[at].inputs[0] is keras_graph.flatten(backbone.inputs)[0]
    depthwise = [c.layer for c in calls if type(c.layer).__name__ == "DepthwiseConv2D"]
    assert len(depthwise) == 17


def test_producer_and_call_count():
    model = _nested()
    assert keras_graph.producer(model.outputs[0]).name == "logits"
    assert keras_graph.producer(model.inputs[0]).name == "pixels"
    inner = model.get_layer("inner")
    assert keras_graph.producer(inner.inputs[0]).name == "inner_in"  # its InputLayer's own name
    assert keras_graph.call_count(model.get_layer("shared")) == 2
    assert keras_graph.call_count(model.get_layer("logits")) == 1


def test_rebuild_reruns_the_graph_with_layers_replaced():
    keras.utils.set_random_seed(0)
    model = _nested()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    # The same layers: the same function, inputs keep their names, the model its name.
    same = keras_graph.rebuild(model, lambda layer: layer)
    assert same.name == "outer" and same.inputs[0].name == model.inputs[0].name
    np.testing.assert_allclose(np.asarray(same(x)), np.asarray(model(x)), rtol=1e-6)
    # Replaced: the nested model rebuilt too, a layer dropped, the batch axis fixed.
    replaced = {}

    def replace(layer):
        if keras_graph.is_functional(layer):
            return keras_graph.rebuild(layer, replace)
        if layer.name == "inner_bn":
            return lambda t, *args, **kwargs: t
        if id(layer) not in replaced:
            replaced[id(layer)] = type(layer).from_config(layer.get_config())
        return replaced[id(layer)]

    new = keras_graph.rebuild(model, replace, input_shape=lambda t: (5,) + tuple(t.shape[1:]))
    assert tuple(new.inputs[0].shape) == (5, 8, 8, 3)
    names = [layer.name for layer in keras_graph.all_layers(new)]
    assert "inner_bn" not in names and "inner" in names
    assert keras_graph.call_count(new.get_layer("shared")) == 2  # still shared
    assert all(a is not b for a in keras_graph.all_layers(new) for b in keras_graph.all_layers(model))
