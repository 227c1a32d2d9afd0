"""Training with a fixed pruning mask: pruned weights stay exactly zero for the whole run.

The optimizer is wrapped (a subclass of its own class, built from its config) so that, inside the
compiled train step, gradients of pruned weights are zeroed before the update and the weights are
zeroed again after it. Momentum, Adam moments and weight decay therefore cannot revive a pruned
weight, and there is no per-step Python work: the masking is two element-wise ops per kernel in
the same graph as the update.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from lottery import masks as masks_mod
from lottery.stats import prunable_variables

log = logging.getLogger(__name__)


def _keras():
    import keras

    return keras


def check_mask(model, mask: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Variables of `model` that `mask` covers, after checking names and shapes (clear errors)."""
    variables = prunable_variables(model)
    unknown = sorted(set(mask) - set(variables))
    if unknown:
        raise ValueError(f"mask names weights the model does not have: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''} (model has: {sorted(variables)[:5]} ...)")
    for name, entry in mask.items():
        masks_mod.expand(entry, tuple(variables[name].shape))  # raises naming both shapes
    return {name: variables[name] for name in mask}


def apply_mask(model, mask: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Zero the pruned weights of `model` in place; returns the non-zero count per masked weight."""
    variables = check_mask(model, mask)
    counts = {}
    for name, var in variables.items():
        value = np.asarray(var.numpy())
        kept = np.where(masks_mod.expand(mask[name], value.shape), value, np.zeros((), value.dtype))
        var.assign(kept)
        counts[name] = int(np.count_nonzero(kept))
    return counts


def nonzero_counts(model, names=None) -> dict[str, int]:
    variables = prunable_variables(model)
    return {n: int(np.count_nonzero(variables[n].numpy())) for n in (names or variables)}


class _MaskedOptimizerMixin:
    """Mixed in front of a Keras optimizer class: masks gradients before, weights after the update."""

    _bt_masks: dict[str, Any]

    def apply(self, grads, trainable_variables=None):
        ops = _keras().ops
        variables = list(self._trainable_variables if trainable_variables is None else trainable_variables)
        # A multiply by a 0/1 mask of the variable's dtype is one fused op per tensor; select with a
        # fresh zeros tensor cost twice that, which showed on small, fast models.
        masked_grads = []
        for grad, var in zip(grads, variables):
            m = self._bt_masks.get(var.path)
            masked_grads.append(grad if grad is None or m is None else grad * ops.cast(m, grad.dtype))
        super().apply(masked_grads, trainable_variables)
        for var in variables:
            m = self._bt_masks.get(var.path)
            if m is not None:
                var.assign(var.value * ops.cast(m, var.dtype))


_MASKED_CLASSES: dict[type, type] = {}


def masked_optimizer(optimizer, model, mask: Mapping[str, np.ndarray]):
    """A fresh optimizer of the same class and config as `optimizer` that honours `mask` on `model`.

    `optimizer` may be an optimizer instance or anything keras.optimizers.get accepts ('sgd', a config).
    """
    keras = _keras()
    base = keras.optimizers.get(optimizer)
    cls = type(base)
    if issubclass(cls, _MaskedOptimizerMixin):
        cls = cls.__bases__[1]  # re-wrapping: start from the original class
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (_MaskedOptimizerMixin, cls), {})
    wrapped = _MASKED_CLASSES[cls].from_config(base.get_config())
    variables = check_mask(model, mask)
    # Tensors captured by the compiled step (not rebuilt per step); paths identify the variables.
    wrapped._bt_masks = {
        var.path: keras.ops.convert_to_tensor(np.asarray(mask[name], dtype=var.dtype))
        for name, var in variables.items()
    }
    return wrapped


def reinitialize(model, seed: int) -> None:
    """Fresh random initial weights for every layer (same architecture), drawn with `seed`.

    Used by the random_reinit control. Layers whose initializers carry their own fixed seed would
    redraw their original values, which would make the control meaningless: that is an error.
    """
    keras = _keras()
    seeded = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for key, value in layer.get_config().items():
            if key.endswith("_initializer") and isinstance(value, dict) \
                    and (value.get("config") or {}).get("seed") is not None:
                seeded.append(f"{layer.name}.{key}")
    if seeded:
        raise ValueError(f"random re-init would redraw the same weights: initializers with a fixed "
                         f"seed in {seeded}")
    keras.utils.set_random_seed(int(seed))
    # from_config rebuilds the architecture with new variables (clone_model would also try to
    # recompile with our masked optimizer class, which is not registered for deserialisation).
    fresh = type(model).from_config(model.get_config())
    model.set_weights(fresh.get_weights())


def train_masked(model, mask: Mapping[str, np.ndarray], train_data, validation_data=None, *,
                 optimizer, loss, epochs: int, metrics=("accuracy",),
                 learning_rate: Callable[[int], float | None] | None = None,
                 batch_size: int | None = None, label: str = "masked") -> dict[str, list[float]]:
    """Apply `mask`, compile `model` with the masked optimizer and train `epochs` epochs.

    `train_data`: (x, y) arrays, a dataset of (x, y) batches, or a callable epoch -> either (so a
    run can reproduce the dense run's per-epoch shuffling). `learning_rate`: epoch -> rate (None
    keeps the optimizer's), set between epochs as the dense driver does. One Keras fit per epoch:
    the compiled step is traced once and reused. Returns the per-epoch history (Keras' metric
    names plus 'lr' and 'time'). Raises RuntimeError if a pruned weight is non-zero afterwards.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    apply_mask(model, mask)
    opt = masked_optimizer(optimizer, model, mask)
    model.compile(optimizer=opt, loss=loss, metrics=list(metrics))
    history: dict[str, list[float]] = {}
    for epoch in tqdm(range(epochs), desc=label, unit="epoch", leave=False, disable=None):
        lr = learning_rate(epoch) if learning_rate is not None else None
        if lr is not None:
            opt.learning_rate.assign(lr)
        data = train_data(epoch) if callable(train_data) else train_data
        x, y = data if isinstance(data, tuple) else (data, None)
        t0 = time.perf_counter()
        logs = model.fit(x, y, batch_size=batch_size, epochs=1, validation_data=validation_data,
                         verbose=0).history
        row = {k: float(v[-1]) for k, v in logs.items()}
        row["lr"] = float(np.asarray(opt.learning_rate))
        row["time"] = time.perf_counter() - t0
        for key, value in row.items():
            history.setdefault(key, []).append(value)
        log.info("%s epoch %d/%d (%.1fs) %s", label, epoch + 1, epochs, row["time"],
                 " ".join(f"{k}={v:.4g}" for k, v in sorted(row.items()) if k != "time"))
    revived = []
    for name, var in check_mask(model, mask).items():
        pruned = ~masks_mod.expand(mask[name], tuple(var.shape))
        if np.count_nonzero(var.numpy()[pruned]):
            revived.append(name)
    if revived:
        raise RuntimeError(f"pruned weights became non-zero during training in {revived}")
    return history
