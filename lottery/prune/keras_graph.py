"""The one seam between lottery and Keras' private API (keras.src, underscore attributes, graph nodes).

Keras 3 has no public way to walk a functional graph call by call, to find the layer behind a
symbolic tensor, to list nested layers recursively, to re-run a graph with its layers swapped, or
to ask an optimizer which variables it updates; pruning and masked training need all of these.
Every such use sits here, under a name that says what it gives,
and tests/lottery/prune/test_keras_graph.py runs each on real tiny models (Sequential, functional,
nested functional, depthwise), so a Keras upgrade that moves an internal fails that test first.

Keras is imported inside the functions: the NumPy pruning maths must import without TensorFlow.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple


class Call(NamedTuple):
    """One call of a layer in a functional graph: the layer and its symbolic input and output tensors."""

    layer: Any
    inputs: list
    outputs: list


class ConvTypes(NamedTuple):
    """Keras' base classes of the convolution families (Conv1D/2D/3D share `conv`, and so on)."""

    conv: type
    transpose: type
    depthwise: type
    separable: type


def conv_types() -> ConvTypes:
    from keras.src.layers.convolutional.base_conv import BaseConv
    from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
    from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

    return ConvTypes(BaseConv, BaseConvTranspose, BaseDepthwiseConv, BaseSeparableConv)


def prunable_layer_types() -> tuple[type, ...]:
    """Layers whose kernels may be pruned: every convolution family, Dense and EinsumDense."""
    from keras.src.layers import Dense, EinsumDense

    return (Dense, EinsumDense, *conv_types())


def all_layers(model) -> list:
    """Every layer inside `model`, nested models and their layers included, `model` itself not."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def optimizer_variables(optimizer) -> list:
    """The model variables a built optimizer updates when `apply` is not told which."""
    return list(optimizer._trainable_variables)


def is_functional(obj) -> bool:
    """True for a functional Keras model (a graph of layer calls); False for Sequential, subclassed
    models and plain layers, whose calls cannot be followed."""
    from keras.src.models.functional import Functional
    from keras.src.models.sequential import Sequential

    return isinstance(obj, Functional) and not isinstance(obj, Sequential)


def flatten(structure) -> list:
    """The tensors of a nested structure (a model's inputs or outputs), in Keras' order."""
    import keras

    return list(keras.tree.flatten(structure))


def calls(fmodel) -> Iterator[Call]:
    """The layer calls of one functional graph in execution order; nested models are single calls."""
    for depth in sorted(fmodel._nodes_by_depth, reverse=True):
        for node in fmodel._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                yield Call(node.operation, list(node.input_tensors), list(node.outputs))


def walk_calls(fmodel) -> Iterator[Call]:
    """The layer calls of a functional graph with nested functional models inlined (their own calls,
    on the nested graph's tensors, in place of the nested model's call)."""
    for call in calls(fmodel):
        if is_functional(call.layer):
            yield from walk_calls(call.layer)
        else:
            yield call


def producer(tensor):
    """The layer that produced a symbolic tensor (for a model input: its InputLayer)."""
    return tensor._keras_history.operation


def call_count(layer) -> int:
    """How many times `layer` is called in the graphs it belongs to (a shared layer: more than once)."""
    return len(layer._inbound_nodes)


def rebuild(fmodel, replace: Callable[[Any], Any], input_shape: Callable[[Any], tuple] | None = None):
    """A new functional model running `fmodel`'s graph with every layer call going to `replace(layer)`.

    The new inputs keep the names of `fmodel`'s InputLayers and their dtypes; their shapes (batch
    axis included) are `input_shape(old input tensor)`, the old shapes by default. The model keeps
    `fmodel`'s name. `replace` may return the same object for several layers (shared layers stay
    shared) or any callable (e.g. an identity, to drop a layer).
    """
    import keras

    def new_input(tensor):
        shape = tuple(tensor.shape) if input_shape is None else tuple(input_shape(tensor))
        # A nested model's input tensor has a generated name; its InputLayer keeps the real one.
        return keras.Input(batch_shape=shape, dtype=tensor.dtype, name=producer(tensor).name)

    inputs = keras.tree.map_structure(new_input, fmodel.input)
    outputs = fmodel._run_through_graph(inputs, operation_fn=replace)
    return keras.Model(inputs, outputs, name=fmodel.name)
