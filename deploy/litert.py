"""A Keras model -> LiteRT flatbuffers: float32, float16, dynamic-range int8, full-integer int8.

Conversion goes Keras -> SavedModel (keras.export.ExportArchive, TensorFlow's documented path for
Keras 3) -> tf.lite.TFLiteConverter, with the batch dimension left dynamic so the interpreter can
be resized to any batch. Only LiteRT's builtin ops are allowed: a model needing a TensorFlow op
without a builtin kernel (a "Flex" op, which would drag the whole TensorFlow runtime onto the
device) is refused at conversion, and every written flatbuffer is checked again from its operator
codes (`operators`, `check_builtin_only`), so a file converted elsewhere cannot slip through.

Variants (`VARIANTS`):
- float32: the plain conversion, the reference of every ratio.
- float16: weights stored as float16 (about half the bytes), computed in float32 on CPUs.
- dynamic_int8: weights int8 per channel, activations float; int8 kernels where LiteRT has them.
- full_int8: weights and activations int8, calibrated on a representative set (images from the
  dataset's train shards); input and output stay float32 unless `int8_io` (then the caller feeds
  int8 and reads int8, with the scales recorded in the file).
- `<variant>_sparse`: the same plus the converter's EXPERIMENTAL_SPARSITY storage (block-sparse
  weight tensors where a tensor is sparse enough). It saves bytes in the file, not time: LiteRT's
  CPU kernels densify such weights when the model is loaded (measured: the same images/s), and
  XNNPACK refuses dynamic_int8_sparse altogether in TF 2.19, which then runs on the slower builtin
  kernels (deploy.measure records the runtime; bench/compression.py measures both).

Mixed-precision models (a `mixed_bfloat16` or `mixed_float16` dtype policy) are rebuilt in float32
first (`as_float32`: same architecture, weights cast), so every variant starts from float32 maths.
"""
from __future__ import annotations

import logging
import re
import tempfile
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lottery.points.inference import input_shape

log = logging.getLogger(__name__)

VARIANTS = ("float32", "float16", "dynamic_int8", "full_int8")
SPARSE_SUFFIX = "_sparse"
_FLEX_PREFIX = "Flex"


class ConversionError(ValueError):
    """A model that cannot be converted to builtin-only LiteRT (the message names the variant)."""


class FlexOpError(ConversionError):
    """The model needs TensorFlow ops that LiteRT has no builtin kernel for (Flex ops)."""


def all_variants(sparse: bool = False) -> tuple[str, ...]:
    return VARIANTS + (tuple(v + SPARSE_SUFFIX for v in VARIANTS) if sparse else ())


def parse_variant(name: str) -> tuple[str, bool]:
    """'dynamic_int8_sparse' -> ('dynamic_int8', True); ValueError naming --variants otherwise."""
    base, sparse = (name[: -len(SPARSE_SUFFIX)], True) if name.endswith(SPARSE_SUFFIX) else (name, False)
    if base not in VARIANTS:
        raise ValueError(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS)}, "
                         f"each optionally with {SPARSE_SUFFIX!r})")
    return base, sparse


# --------------------------------------------------------------------------- mixed precision
def _layers(layer) -> Iterator[Any]:
    for sub in getattr(layer, "layers", ()):
        yield sub
        yield from _layers(sub)


def is_mixed_precision(model) -> bool:
    """Any layer computing in other than float32 (a mixed or low-precision dtype policy)."""
    return any(getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32") != "float32"
               for layer in _layers(model))


def _float32_config(node):
    """The config with every dtype policy replaced by float32 (nested models included)."""
    if isinstance(node, dict):
        if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and "config" in node:
            return {**node, "config": {**node["config"], "name": "float32"}}
        return {k: _float32_config(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_float32_config(v) for v in node]
    if isinstance(node, str) and node.startswith("mixed_"):
        return "float32"
    return node


def as_float32(model):
    """`model` itself when it computes in float32; else the same architecture rebuilt with float32
    policies and the weights cast to float32 (a mixed-precision model's variables are float32
    already; the cast covers models built in a plain low-precision policy)."""
    import keras

    if not is_mixed_precision(model):
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")   # layers without their own policy follow the global
    try:
        rebuilt = model.__class__.from_config(_float32_config(model.get_config()))
    finally:
        keras.config.set_dtype_policy(previous)
    rebuilt.set_weights([np.asarray(w, dtype=np.float32) if np.issubdtype(np.asarray(w).dtype, np.floating)
                         else w for w in model.get_weights()])
    log.info("model %s: mixed precision rebuilt in float32 for export", model.name)
    return rebuilt


# --------------------------------------------------------------------------- conversion
def _input_shape(model) -> tuple[int, ...]:
    try:
        return input_shape(model, "LiteRT export")
    except ValueError as err:
        raise ConversionError(str(err)) from None


def _flex_ops(message: str) -> list[str]:
    found = re.search(r"TF Select ops:\s*([^\n]+)", message)
    return [op.strip() for op in found.group(1).split(",")] if found else []


def convert(model, variant: str, *, representative: Callable[[], Iterable[np.ndarray]] | None = None,
            int8_io: bool = False) -> bytes:
    """The flatbuffer of `model` (float32 maths: see as_float32) as `variant`.

    representative: returns an iterable of float32 image batches for full_int8's calibration.
    int8_io: full_int8 only, int8 input and output instead of float32.
    """
    import keras
    import tensorflow as tf

    base, sparse = parse_variant(variant)
    if base == "full_int8" and representative is None:
        raise ConversionError("full_int8 needs a representative set (images from the train shards)")
    shape = _input_shape(model)
    with tempfile.TemporaryDirectory(prefix="bt-quantize-") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", lambda x: model(x, training=False),
                             input_signature=[tf.TensorSpec((None,) + shape, tf.float32)])
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        optimizations = []
        if base != "float32":
            optimizations.append(tf.lite.Optimize.DEFAULT)
        if base == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if base == "full_int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

            def calibration():
                for batch in representative():
                    for image in np.asarray(batch, dtype=np.float32):
                        yield [image[np.newaxis]]

            converter.representative_dataset = calibration
            if int8_io:
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
        if sparse:
            optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
        converter.optimizations = optimizations
        try:
            flatbuffer = converter.convert()
        except Exception as err:  # the converter raises its own ConverterError (not exported)
            text = str(err)
            flex = _flex_ops(text)
            if flex or "ERROR_NEEDS_FLEX_OPS" in text:
                raise FlexOpError(f"model {model.name!r}, variant {variant}: needs TensorFlow ops with "
                                  f"no LiteRT builtin kernel (Flex ops: {', '.join(flex) or 'unnamed'}); "
                                  f"only builtin-op models are exported") from None
            first = next((line for line in text.splitlines() if "error" in line.lower()), text[:300])
            raise ConversionError(f"model {model.name!r}, variant {variant}: LiteRT conversion "
                                  f"failed: {first.strip()}") from err
    check_builtin_only(flatbuffer, f"model {model.name!r}, variant {variant}")
    return flatbuffer


# --------------------------------------------------------------------------- operator check
def _builtin_names() -> dict[int, str]:
    from tensorflow.lite.python import schema_py_generated as schema

    return {value: name for name, value in vars(schema.BuiltinOperator).items()
            if not name.startswith("_") and isinstance(value, int)}


def operators(flatbuffer: bytes) -> list[str]:
    """The operator codes of a LiteRT flatbuffer, by name: builtin names (CONV_2D, ...), and for
    custom ops their custom code (Flex ops are custom ops named Flex<TensorFlow op>)."""
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(flatbuffer, 0)
        count = model.OperatorCodesLength()
    except Exception as err:  # a flatbuffer that does not parse is refused, not guessed at
        raise ConversionError(f"not a LiteRT flatbuffer ({err})") from None
    names, out = _builtin_names(), []
    for i in range(count):
        code = model.OperatorCodes(i)
        # Schema rule: the real code is the larger of the two fields (codes above 127 live only in
        # builtin_code; older files only fill deprecated_builtin_code).
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = code.CustomCode()
            out.append(custom.decode() if custom else "CUSTOM")
        else:
            out.append(names.get(builtin, f"BUILTIN_{builtin}"))
    return out


def check_builtin_only(flatbuffer: bytes, what: str) -> list[str]:
    """The file's operator names; FlexOpError (ConversionError for other custom ops) otherwise."""
    names = operators(flatbuffer)
    builtin = set(_builtin_names().values()) - {"CUSTOM"}
    flex = sorted({n for n in names if n.startswith(_FLEX_PREFIX)})
    if flex:
        raise FlexOpError(f"{what}: the LiteRT file holds Flex ops {flex} (TensorFlow kernels, not "
                          f"LiteRT builtins); only builtin-op models are accepted")
    custom = sorted({n for n in names if n not in builtin})
    if custom:
        raise ConversionError(f"{what}: the LiteRT file holds custom ops {custom}; only builtin "
                              f"ops are accepted")
    return names
