"""L-infinity evasion attacks (FGSM, PGD) and robust accuracy, batched and compiled.

Scale. Every model of the registry takes float32 RGB pixels in [0, 255] and normalises inside
(train.models), and the data pipeline feeds exactly that. Epsilons and step sizes are given on the
[0, 1] image scale, as the literature quotes them (eps 8/255 on CIFAR, 0.1-0.3 on MNIST), and are
multiplied by PIXEL_SCALE = 255 before they touch the model's input: eps 0.1 allows each pixel to
move by 25.5 grey levels. The valid pixel range [0, 255] is enforced after every step (and after
the random start), so an adversarial example is always an image the pipeline could have produced
(before JPEG rounding: pixels stay real-valued).

Loss. The attack ascends the cross-entropy of the logits (the input of the model's float32 softmax
layer "probs"), not of the probabilities: a saturated softmax gives a zero gradient in float32 and
would make the model look robust (gradient masking). Models without that layer are attacked
through log(probs).

PGD (Madry et al. 2018): x_0 = x + U(-eps, eps) (random start) clipped to the pixel range, then
`steps` times x <- clip(x + step_size * sign(grad), x - eps, x + eps, 0, 255). FGSM (Goodfellow
et al. 2015) is one step of size eps without random start. With `restarts` > 1 PGD runs again from
fresh random starts and keeps, per example, the worst case: a misclassified example over a
correctly classified one, else the one of higher loss. Randomness is stateless and seeded per
(seed, batch, restart), so an evaluation is reproducible.

Everything per batch is one tf.function (the PGD loop is a tf.while_loop, epsilon a tensor
argument, so a list of epsilons traces once); there is no per-example Python work.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

PIXEL_SCALE = 255.0     # [0, 1] image scale -> the models' input scale
PIXEL_RANGE = (0.0, 255.0)
ATTACKS = ("fgsm", "pgd")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """One attack. epsilon and step_size on the [0, 1] image scale (module docstring)."""

    attack: str = "pgd"
    epsilon: float = 0.0
    steps: int = 10
    step_size: float | None = None      # None: 2.5 * epsilon / steps (Madry et al.)
    random_start: bool = True
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"attack: {self.attack!r} is not one of {', '.join(ATTACKS)}")
        if not (isinstance(self.epsilon, (int, float)) and 0 <= self.epsilon <= 1):
            raise ValueError(f"epsilon: {self.epsilon!r} must lie in [0, 1] (the [0, 1] image scale)")
        if self.attack == "pgd" and not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps: PGD needs at least one step, got {self.steps!r}")
        if self.step_size is not None and not 0 < self.step_size <= 1:
            raise ValueError(f"step_size: {self.step_size!r} must lie in (0, 1]")
        if not (isinstance(self.restarts, int) and self.restarts >= 1):
            raise ValueError(f"restarts: must be an integer >= 1, got {self.restarts!r}")

    @property
    def resolved_steps(self) -> int:
        return 1 if self.attack == "fgsm" else self.steps

    def resolved_step_size(self, epsilon: float | None = None) -> float:
        """Step on the [0, 1] scale: FGSM steps by epsilon; PGD by step_size or 2.5 eps / steps."""
        eps = self.epsilon if epsilon is None else epsilon
        if self.attack == "fgsm":
            return eps
        return self.step_size if self.step_size is not None else 2.5 * eps / self.steps

    @property
    def uses_random_start(self) -> bool:
        return self.attack == "pgd" and self.random_start

    def describe(self) -> dict[str, Any]:
        """The record a result carries (resolved step size and steps)."""
        return {"attack": self.attack, "epsilon": self.epsilon, "steps": self.resolved_steps,
                "step_size": self.resolved_step_size(), "random_start": self.uses_random_start,
                "restarts": self.restarts if self.attack == "pgd" else 1, "seed": self.seed,
                "pixel_scale": PIXEL_SCALE}


def logits_model(model):
    """A function x -> float32 logits sharing `model`'s weights (module docstring: Loss)."""
    import keras
    import tensorflow as tf

    try:
        probs = model.get_layer("probs")
    except ValueError:
        probs = None
    if probs is not None and isinstance(probs, keras.layers.Activation):
        inner = keras.Model(model.inputs, probs.input)
        return lambda x: tf.cast(inner(x, training=False), tf.float32)
    return lambda x: tf.math.log(tf.maximum(tf.cast(model(x, training=False), tf.float32), 1e-12))


def perturb(logits_fn, x, y, *, epsilon, step_size, steps: int, random_start: bool, seed):
    """One PGD / FGSM run on a batch (graph code: call it inside a tf.function).

    x: float32 [n, ...] on the model's scale; y: int labels [n]; epsilon, step_size: scalars on the
    model's scale (tensors are fine); seed: int32 [2] for the stateless random start.
    Returns (x_adv, per-example loss at x_adv, per-example correctness at x_adv).
    """
    import tensorflow as tf

    lo, hi = PIXEL_RANGE
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.cast(tf.reshape(y, [-1]), tf.int32)
    epsilon = tf.cast(epsilon, tf.float32)
    step_size = tf.cast(step_size, tf.float32)
    lower = tf.maximum(x - epsilon, lo)
    upper = tf.minimum(x + epsilon, hi)

    def loss_of(xa):
        logits = logits_fn(xa)
        return logits, tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    if random_start:
        noise = tf.random.stateless_uniform(tf.shape(x), seed=seed, minval=-1.0, maxval=1.0)
        start = tf.clip_by_value(x + epsilon * noise, lower, upper)
    else:
        start = x

    def body(i, xa):
        with tf.GradientTape() as tape:
            tape.watch(xa)
            _, loss = loss_of(xa)
        grad = tape.gradient(loss, xa)
        xa = xa + step_size * tf.sign(grad)
        return i + 1, tf.clip_by_value(xa, lower, upper)

    _, x_adv = tf.while_loop(lambda i, _: i < steps, body, (tf.constant(0), start))
    x_adv = tf.stop_gradient(x_adv)
    logits, loss = loss_of(x_adv)
    correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
    return x_adv, loss, correct


def worst_case(logits_fn, x, y, config: AttackConfig, epsilon, seed):
    """`config`'s attack with its restarts at `epsilon` (model scale), keeping per example the worst
    case (misclassified first, then highest loss). Graph code. Returns (x_adv, loss, correct)."""
    import tensorflow as tf

    epsilon = tf.cast(epsilon, tf.float32)
    if config.attack == "fgsm":
        step = epsilon
    elif config.step_size is not None:
        step = config.step_size * PIXEL_SCALE
    else:
        step = 2.5 * epsilon / config.steps  # Madry et al.'s default, on the model's scale
    restarts = config.restarts if config.uses_random_start else 1
    best = None
    for r in range(restarts):  # a handful, unrolled at trace time
        run_seed = tf.stack([tf.cast(seed[0], tf.int32), tf.cast(seed[1], tf.int32) * 1009 + r])
        x_adv, loss, correct = perturb(logits_fn, x, y, epsilon=epsilon, step_size=step,
                                       steps=config.resolved_steps,
                                       random_start=config.uses_random_start, seed=run_seed)
        if best is None:
            best = (x_adv, loss, correct)
            continue
        bx, bl, bc = best
        # Replace where the new run is worse for the model: it breaks an example the old one did
        # not, or both agree on correctness and the new loss is higher.
        take = (bc & ~correct) | ((bc == correct) & (loss > bl))
        mask = tf.reshape(take, [-1] + [1] * (len(x.shape) - 1))
        best = (tf.where(mask, x_adv, bx), tf.where(take, loss, bl), tf.where(take, correct, bc))
    return best


def batch_attack(model, config: AttackConfig):
    """A compiled fn(x, y, epsilon_model_scale, seed[2]) -> (x_adv, loss, correct) for `model`."""
    import tensorflow as tf

    logits_fn = logits_model(model)

    @tf.function(reduce_retracing=True)
    def run(x, y, epsilon, seed):
        return worst_case(logits_fn, x, y, config, epsilon, seed)

    return run


class RobustEvaluator:
    """Accuracy of one model under one attack (any epsilon): its compiled functions are traced
    once and reused over batches, epsilons and calls."""

    def __init__(self, model, config: AttackConfig):
        import tensorflow as tf

        self.config = config
        self._attack = batch_attack(model, config)
        logits_fn = logits_model(model)

        @tf.function(reduce_retracing=True)
        def clean(x, y):
            logits = logits_fn(x)
            y = tf.cast(tf.reshape(y, [-1]), tf.int32)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            return loss, tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)

        self._clean = clean

    def evaluate(self, data: Iterable, epsilons: Iterable[float], *,
                 max_batches: int | None = None) -> dict[float, dict[str, float]]:
        """{epsilon: {accuracy, loss, examples, seconds}} over the (x, y) batches of `data` (on
        the model's scale); epsilon 0 is the clean accuracy (no attack runs)."""
        import time

        import numpy as np
        import tensorflow as tf

        config = self.config
        eps_list = [float(e) for e in epsilons]
        for e in eps_list:
            dataclasses.replace(config, epsilon=e)  # validates each epsilon
        sums = {e: [0.0, 0.0, 0, 0.0] for e in eps_list}  # correct, loss, examples, seconds
        for index, (x, y) in enumerate(data):
            if max_batches is not None and index >= max_batches:
                break
            for e in eps_list:
                t0 = time.perf_counter()
                if e == 0:
                    loss, correct = self._clean(x, y)
                else:
                    _, loss, correct = self._attack(x, y, tf.constant(e * PIXEL_SCALE, tf.float32),
                                                    tf.constant([config.seed, index], tf.int32))
                row = sums[e]
                row[0] += float(np.sum(correct.numpy()))
                row[1] += float(np.sum(loss.numpy()))
                row[2] += int(correct.shape[0])
                row[3] += time.perf_counter() - t0
        out = {}
        for e, (correct, loss, n, seconds) in sums.items():
            if n == 0:
                raise ValueError("robust accuracy: the data has no examples")
            out[e] = {"accuracy": correct / n, "loss": loss / n, "examples": n, "seconds": seconds}
        return out


def robust_accuracy(model, data: Iterable, epsilons: Iterable[float], config: AttackConfig,
                    *, max_batches: int | None = None) -> dict[float, dict[str, float]]:
    """Accuracy and mean loss of `model` on `data` ((x, y) batches on the model's scale) under
    `config`'s attack at each epsilon of `epsilons` ([0, 1] scale). Epsilon 0 is the clean
    accuracy (no attack runs). Returns {epsilon: {accuracy, loss, examples, seconds}}."""
    return RobustEvaluator(model, config).evaluate(data, epsilons, max_batches=max_batches)


def parse_epsilons(text: str | Iterable[float], field: str = "--eps") -> tuple[float, ...]:
    """'0,0.02,0.1' (or numbers) -> sorted unique epsilons on the [0, 1] scale; ValueError naming
    `field`. Fractions like 8/255 are accepted."""
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        raw = str(item).strip()
        if not raw:
            continue
        try:
            num, _, den = raw.partition("/")
            value = float(num) / (float(den) if den else 1.0)
        except ValueError:
            raise ValueError(f"{field}: {raw!r} is not a number (write e.g. 0,0.05,8/255)") from None
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{field}: {raw} must lie in [0, 1] (the [0, 1] image scale)")
        values.append(round(value, 6))
    if not values:
        raise ValueError(f"{field}: give at least one epsilon")
    return tuple(sorted(set(values)))


def attack_config(values: Mapping[str, Any]) -> AttackConfig:
    """An AttackConfig from a JSON record (unknown keys are errors naming them)."""
    known = {f.name for f in dataclasses.fields(AttackConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"attack settings: unknown field(s) {unknown} (known: {sorted(known)})")
    return AttackConfig(**dict(values))
