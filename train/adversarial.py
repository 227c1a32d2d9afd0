"""Adversarial training (Madry et al. 2018): every training batch is replaced by its PGD examples
inside the compiled train step.

`install(model, config)` wraps the model's own `train_step` (an instance attribute, so Keras'
fit and train_on_batch of every engine, and the masked optimizer of grid points, run it unchanged):
the step first runs the attack (train.attacks.worst_case, on the model in inference mode, so
BatchNorm statistics see only the examples trained on) and then the original step on the
perturbed batch. No Python runs per step; the random start is stateless, seeded by the
optimizer's step counter, so a resumed run draws the same starts as an uninterrupted one. The
multiworker engine's own step calls `adversarial_inputs` directly.

The settings (DenseSettings and GridSettings): adversarial ("none" | "pgd" | "fgsm"),
adv_epsilon ([0, 1] image scale), adv_steps, adv_step_size (None: 2.5 * eps / steps),
adv_random_start. The metrics a run records during training (loss, accuracy) are then those of the
adversarial batches; validation stays clean.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Mapping

from train.attacks import PIXEL_SCALE, AttackConfig, logits_model, worst_case

ADVERSARIAL_MODES = ("none", "pgd", "fgsm")
# The settings' names and defaults (shared by DenseSettings and GridSettings); at these values a
# run or grid planned before they existed keeps its identity.
ADV_DEFAULTS = {"adversarial": "none", "adv_epsilon": 0.0, "adv_steps": 7, "adv_step_size": None,
                "adv_random_start": True}
_ATTR = "_bt_adversarial_inputs"


def config_from(settings: Any) -> AttackConfig | None:
    """The training attack of a settings object or mapping (None when adversarial is "none").

    ValueError naming the field when adversarial training is asked for without an epsilon."""
    get = settings.get if isinstance(settings, Mapping) else (lambda k, d: getattr(settings, k, d))
    mode = get("adversarial", "none") or "none"
    if mode == "none":
        return None
    if mode not in ADVERSARIAL_MODES:
        raise ValueError(f"adversarial: {mode!r} is not one of {', '.join(ADVERSARIAL_MODES)}")
    eps = get("adv_epsilon", 0.0)
    if not eps or eps <= 0:
        raise ValueError(f"adv_epsilon: adversarial={mode} needs adv_epsilon > 0 (on the [0, 1] "
                         f"image scale, e.g. 0.1 for digits, 8/255 = 0.0314 for CIFAR)")
    return AttackConfig(attack=mode, epsilon=float(eps), steps=int(get("adv_steps", 7)),
                        step_size=get("adv_step_size", None),
                        random_start=bool(get("adv_random_start", True)))


def check_settings(settings: Any) -> None:
    """Validation for the settings classes' model validators (errors name the field)."""
    config_from(settings)
    steps = settings.get("adv_steps", 7) if isinstance(settings, Mapping) else settings.adv_steps
    if steps < 1:
        raise ValueError(f"adv_steps: must be >= 1, got {steps}")


def adversarial_inputs(model, x, y):
    """The batch `x` replaced by its adversarial examples when `model` trains adversarially, else
    `x` itself. Graph code (inside a train step)."""
    fn = getattr(model, _ATTR, None)
    return x if fn is None else fn(x, y)


def install(model, config: AttackConfig | None, seed: int = 0):
    """Make `model`'s train step adversarial under `config` (None: leave it natural). Returns
    `model`. Installing twice replaces the earlier attack."""
    import keras
    import tensorflow as tf

    if config is None:
        return model
    logits_fn = logits_model(model)
    epsilon = config.epsilon * PIXEL_SCALE

    def perturbed(x, y):
        step = getattr(model.optimizer, "iterations", None) if model.optimizer is not None else None
        counter = tf.constant(0, tf.int32) if step is None else tf.cast(step % (2**31 - 1), tf.int32)
        x_adv, _, _ = worst_case(logits_fn, x, y, config, epsilon,
                                 tf.stack([tf.constant(seed, tf.int32), counter]))
        return tf.cast(x_adv, x.dtype)

    base_step = type(model).train_step.__get__(model)  # the class's step, even when re-installed

    def train_step(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = perturbed(x, y)
        return base_step(keras.utils.pack_x_y_sample_weight(x, y, sample_weight))

    # Plain attributes (functions are not tracked by Keras): the model's variables are unchanged.
    object.__setattr__(model, _ATTR, perturbed)
    object.__setattr__(model, "train_step", train_step)
    object.__setattr__(model, "train_function", None)  # a compiled step of before must not be reused
    return model


def describe(config: AttackConfig | None) -> dict[str, Any]:
    """What a history / result records about the training attack."""
    if config is None:
        return {"adversarial": "none"}
    return {"adversarial": config.attack, **{f"adv_{k}": v for k, v in config.describe().items()
                                             if k in ("epsilon", "steps", "step_size",
                                                      "random_start")}}


# Grid points: the grid's attack for the point being retrained, set by the point dispatcher
# (lottery.points.runners.train_point) around the runner and read where every kind of point
# retrains (lottery.points.recipe.retrain), so no runner passes it along.
_RETRAINING: contextvars.ContextVar[AttackConfig | None] = contextvars.ContextVar(
    "bigticket_adversarial_retraining", default=None)


@contextlib.contextmanager
def retraining(config: AttackConfig | None) -> Iterator[None]:
    """Within the block, `retraining_config()` is `config` (None: natural retraining)."""
    token = _RETRAINING.set(config)
    try:
        yield
    finally:
        _RETRAINING.reset(token)


def retraining_config() -> AttackConfig | None:
    return _RETRAINING.get()
