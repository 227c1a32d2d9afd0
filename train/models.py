"""The model registry: every architecture the dense stage can train.

Conventions shared by every model (the lottery stage relies on them):
- Input: float32 RGB pixels in [0, 255] of shape (input_size, input_size, 3). Normalisation is a
  `Rescaling` layer INSIDE the model, so a checkpoint or `model.keras` is self-contained and no
  consumer can feed it differently normalised pixels.
- Output: class probabilities (softmax), computed in float32 even under mixed precision.
- No `Lambda` layers: everything saves and loads with `safe_mode=True`.
- Uncompiled, and deterministic given `keras.utils.set_random_seed`.
- No dropout: a model's forward pass depends only on its weights, which keeps resumed runs
  bit-identical to uninterrupted ones.
"""
from __future__ import annotations

from typing import Any, Callable

from common.settings import did_you_mean

MIN_MOBILENET_INPUT = 32


def _keras():
    """Keras, imported on first build: validating settings (model names) must not pay for it."""
    import keras

    return keras, keras.layers


def _normalised_input(input_size: int, scale: float, offset: float) -> tuple[Any, Any]:
    keras, layers = _keras()
    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    return inputs, layers.Rescaling(scale, offset=offset, name="normalise")(inputs)


def _classifier(x, num_classes: int):
    keras, layers = _keras()
    x = layers.Dense(num_classes, name="logits")(x)
    # Softmax in float32: under mixed_float16 the logits are float16 and a float16 softmax
    # under/overflows (Keras' mixed-precision guide does exactly this).
    return layers.Activation("softmax", dtype="float32", name="probs")(x)


def _check_options(name: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        hint = did_you_mean(unknown[0], allowed) if len(unknown) == 1 else ""
        raise ValueError(f"model_options: {unknown} not accepted by model {name!r}{hint} "
                         f"(accepted: {sorted(allowed) or 'none'})")


def mobilenet_v2(num_classes: int, input_size: int, alpha: float = 1.0,
                 bn_momentum: float = 0.99):
    """Keras' MobileNetV2 (weights=None) with our classifier head.

    MobileNetV2 needs inputs of at least 32x32 (five stride-2 stages). Smaller images are
    upsampled to 32x32 by a `Resizing` layer inside the model (bilinear), so the caller still
    feeds the dataset's native size and the model stays Lambda-free.

    `bn_momentum`: Keras builds MobileNetV2 with batch-norm momentum 0.999, tuned for ImageNet's
    ~5k steps per epoch; its moving statistics would stay near their initial values for the
    first thousands of steps, and evaluation at chance. We use Keras' layer default 0.99 (0.9
    suits tiny datasets such as digits).
    """
    if not 0 < bn_momentum < 1:
        raise ValueError(f"model_options.bn_momentum must be in (0, 1), got {bn_momentum}")
    keras, layers = _keras()
    inputs, x = _normalised_input(input_size, 1.0 / 127.5, -1.0)  # MobileNetV2 expects [-1, 1]
    size = input_size
    if input_size < MIN_MOBILENET_INPUT:
        x = layers.Resizing(MIN_MOBILENET_INPUT, MIN_MOBILENET_INPUT, name="upsample")(x)
        size = MIN_MOBILENET_INPUT
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None, pooling="avg"
    )
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum  # saved in the layer config, so it survives load_model
    x = backbone(x)
    return keras.Model(inputs, _classifier(x, num_classes), name=f"mobilenet_v2_{alpha:g}")


def _resnet_block(x, filters: int, stride: int, name: str, bn_momentum: float):
    keras, layers = _keras()
    init = "he_normal"
    bn = {"momentum": bn_momentum}
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                      kernel_initializer=init, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1", **bn)(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init,
                      name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2", **bn)(y)
    if stride != 1 or x.shape[-1] != filters:
        # Option B (He et al. 2016, sec. 4.2): a 1x1 strided projection where the shape changes.
        # Option A's zero-padded identity needs a Lambda (channel padding), which safe_mode
        # refuses; B costs two small convolutions per network and is slightly more accurate.
        x = layers.Conv2D(filters, 1, strides=stride, use_bias=False, kernel_initializer=init,
                          name=f"{name}_proj")(x)
        x = layers.BatchNormalization(name=f"{name}_proj_bn", **bn)(x)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, y]))


def _cifar_resnet(depth: int) -> Callable[..., Any]:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    blocks = (depth - 2) // 6

    def build(num_classes: int, input_size: int, width: int = 16, bn_momentum: float = 0.99):
        """He et al. 2016's CIFAR ResNet: 3 stages of `blocks` basic blocks, width/2w/4w filters.

        `bn_momentum`: Keras' default 0.99 suits CIFAR's ~400 steps per epoch; a tiny dataset
        (digits: ~23) needs 0.9 or the moving statistics, and so evaluation, lag for many epochs.
        """
        if not 0 < bn_momentum < 1:
            raise ValueError(f"model_options.bn_momentum must be in (0, 1), got {bn_momentum}")
        keras, layers = _keras()
        inputs, x = _normalised_input(input_size, 1.0 / 255.0, 0.0)
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                          name="stem_conv")(x)
        x = layers.ReLU(name="stem_relu")(
            layers.BatchNormalization(name="stem_bn", momentum=bn_momentum)(x))
        for stage, filters in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _resnet_block(x, filters, stride, f"s{stage + 1}b{block + 1}", bn_momentum)
        x = layers.GlobalAveragePooling2D(name="pool")(x)
        return keras.Model(inputs, _classifier(x, num_classes), name=f"resnet{depth}")

    return build


def lenet_300_100(num_classes: int, input_size: int):
    """LeCun et al.'s fully connected 300-100 network (Frankle & Carbin's MNIST experiments)."""
    keras, layers = _keras()
    inputs, x = _normalised_input(input_size, 1.0 / 255.0, 0.0)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(300, activation="relu", name="fc1")(x)
    x = layers.Dense(100, activation="relu", name="fc2")(x)
    return keras.Model(inputs, _classifier(x, num_classes), name="lenet_300_100")


def conv_small(num_classes: int, input_size: int, blocks: int = 2, width: float = 1.0,
               dense: int = 256):
    """Frankle & Carbin's Conv-2/4/6: `blocks` x (two 3x3 convs + 2x2 max-pool), 64/128/256
    filters (times `width`), then two dense layers of `dense` units. Default blocks=2 is Conv-4."""
    keras, layers = _keras()
    if not 1 <= blocks <= 3:
        raise ValueError(f"model_options.blocks: conv_small takes 1..3 blocks, got {blocks}")
    if width <= 0 or dense < 1:
        raise ValueError("model_options.width must be > 0 and model_options.dense >= 1")
    inputs, x = _normalised_input(input_size, 1.0 / 255.0, 0.0)
    for b in range(blocks):
        filters = max(1, int(round(64 * (2 ** b) * width)))
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{b + 1}a")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{b + 1}b")(x)
        if x.shape[1] >= 2:  # tiny inputs: stop pooling at 1x1 instead of failing
            x = layers.MaxPooling2D(2, name=f"pool{b + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense, activation="relu", name="fc1")(x)
    x = layers.Dense(dense, activation="relu", name="fc2")(x)
    return keras.Model(inputs, _classifier(x, num_classes), name=f"conv_{2 * blocks}")


# name -> (builder, accepted options)
MODELS: dict[str, tuple[Callable[..., Any], set[str]]] = {
    "mobilenet_v2": (mobilenet_v2, {"alpha", "bn_momentum"}),
    "resnet20": (_cifar_resnet(20), {"width", "bn_momentum"}),
    "resnet44": (_cifar_resnet(44), {"width", "bn_momentum"}),
    "resnet56": (_cifar_resnet(56), {"width", "bn_momentum"}),
    "lenet_300_100": (lenet_300_100, set()),
    "conv_small": (conv_small, {"blocks", "width", "dense"}),
}


# Models built with BatchNormalization layers (the Early-Bird mask and bn_l1 need them); a test
# builds every registered model and checks this set against its layers.
BATCHNORM_MODELS = frozenset({"mobilenet_v2", "resnet20", "resnet44", "resnet56"})


def has_batchnorm(name: str) -> bool:
    return name in BATCHNORM_MODELS


def _all_layers(layer):
    for sub in getattr(layer, "layers", ()):
        yield sub
        yield from _all_layers(sub)


def add_bn_l1(model, strength: float) -> int:
    """An L1 penalty `strength * sum|gamma|` on every BatchNorm scale of `model`, nested models
    included (network slimming, Liu et al. 2017); returns how many gammas it covers.

    Set on the built variable (what Keras sums into `model.losses`) and on the layer (what its
    config saves), so model.keras reloads with the same penalty under safe_mode."""
    keras, layers = _keras()
    count = 0
    for layer in _all_layers(model):
        if isinstance(layer, layers.BatchNormalization) and getattr(layer, "gamma", None) is not None:
            layer.gamma_regularizer = keras.regularizers.L1(strength)
            layer.gamma.regularizer = layer.gamma_regularizer
            count += 1
    return count


DEFAULT_BN_MOMENTUM = 0.99   # the builders' default (Keras' BatchNormalization default)
# Candidate momenta, largest first: auto picks the largest whose averaging window 1/(1 - m)
# steps fits twice in an epoch, so the statistics an evaluation reads come from the current
# epoch's weights rather than from the initial ones (mean 0, variance 1).
AUTO_BN_MOMENTA = (DEFAULT_BN_MOMENTUM, 0.95, 0.9)


def auto_bn_momentum(steps_per_epoch: int) -> float:
    """BatchNorm momentum for a run of `steps_per_epoch` steps per epoch: 0.99 from 200 steps
    (ImageNet, CIFAR at batch <= 250: today's default, unchanged), 0.95 from 40, else 0.9."""
    for momentum in AUTO_BN_MOMENTA:
        if 2.0 / (1.0 - momentum) <= steps_per_epoch + 1e-9:
            return momentum
    return AUTO_BN_MOMENTA[-1]


def resolve_bn_momentum(name: str, options: dict, steps_per_epoch: int | None
                        ) -> tuple[dict, float | None]:
    """(model options, the BatchNorm momentum the model will use; None: no such option).

    A momentum the user set is kept. Otherwise auto_bn_momentum; it is written into the options
    only when it differs from the default, so runs that keep today's momentum keep today's options
    (and identity hash), while a run given another momentum is another run."""
    check_model_options(name, options)
    if "bn_momentum" not in MODELS[name][1]:
        return dict(options), None
    if "bn_momentum" in options:
        return dict(options), float(options["bn_momentum"])
    if steps_per_epoch is None:
        return dict(options), DEFAULT_BN_MOMENTUM
    momentum = auto_bn_momentum(steps_per_epoch)
    if momentum == DEFAULT_BN_MOMENTUM:
        return dict(options), momentum
    return {**options, "bn_momentum": momentum}, momentum


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}{did_you_mean(name, MODELS)} "
                         f"(known models: {', '.join(sorted(MODELS))})")


def check_model_options(name: str, options: dict) -> None:
    check_model_name(name)
    _check_options(name, dict(options), MODELS[name][1])


def build_model(name: str, num_classes: int, input_size: int, *, bn_l1: float = 0.0, **options):
    """An uncompiled model from the registry; ValueError names an unknown model or option.
    `bn_l1` > 0 adds an L1 penalty on every BatchNorm scale (add_bn_l1)."""
    check_model_options(name, options)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    if bn_l1 < 0:
        raise ValueError(f"bn_l1 must be >= 0, got {bn_l1}")
    builder, _ = MODELS[name]
    model = builder(num_classes, input_size, **options)
    if bn_l1 > 0 and not add_bn_l1(model, bn_l1):
        raise ValueError(f"bn_l1: model {name!r} has no BatchNorm layers")
    return model
