"""Training with a fixed pruning mask: pruned weights stay exactly zero for the whole run.

The optimizer is wrapped (a subclass of its own class, built from its config, by
`train.masked_optimizer`, which dense gradual pruning shares) so that, inside the
compiled train step, gradients of pruned weights are zeroed before the update and the weights are
zeroed again after it. Momentum, Adam moments and weight decay therefore cannot revive a pruned
weight, and there is no per-step Python work: the masking is element-wise ops in the same graph as
the update. For the optimizers whose update of a weight is exactly zero when its gradient and its
state entries are zero (zero_preserving_optimizers(): SGD with momentum/Nesterov/weight decay, the
Adam family, RMSprop, Adagrad, Adadelta, Lion), the weight mask after the update cannot change
anything and is skipped: the optimizer starts fresh, or from this point's own checkpoint, which was
trained under the same mask, so its state is zero wherever the gradient always was. It was a sixth
of the step of LeNet-300-100 without XLA. Other optimizers (Muon orthogonalises the whole update,
Ftrl, schedule-free methods) keep it. Every epoch ends with a check that pruned weights are still
zero.

Preemption: a `common.stop.StopToken` passed as `stop=` makes a running `train_masked` raise
`Preempted` after the batch in which it was requested. With an `EpochCheckpoint`
(lottery.points.epoch_checkpoint), every complete epoch is saved first (model variables, optimizer
state, history, epoch index), so a later call with the same checkpoint resumes at the next epoch
instead of from scratch; the partly trained epoch is dropped. Each epoch then starts from a seed
derived from (checkpoint seed, epoch), so a resumed run draws the same random numbers as an
uninterrupted one. The checkpoint is left in place when training ends: its owner (the grid point)
removes it once the point's result is kept.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from common.stop import StopToken
from lottery.points.epoch_checkpoint import EpochCheckpoint
from lottery.prune import keras_graph
from lottery.prune import masks as masks_mod
from lottery.prune.stats import prunable_variables
from train.masked_optimizer import _MaskedOptimizerMixin, fixed_mask_optimizer, zero_preserving_optimizers  # noqa: F401

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


def masked_optimizer(optimizer, model, mask: Mapping[str, np.ndarray]):
    """A fresh optimizer of the same class and config as `optimizer` that honours `mask` on `model`.

    `optimizer` may be an optimizer instance or anything keras.optimizers.get accepts ('sgd', a config).
    """
    keras = _keras()
    base = keras.optimizers.get(optimizer)
    variables = check_mask(model, mask)
    # Tensors captured by the compiled step (not rebuilt per step); paths identify the variables.
    return fixed_mask_optimizer(base, {
        var.path: keras.ops.convert_to_tensor(np.asarray(mask[name], dtype=var.dtype))
        for name, var in variables.items()
    })


def reinitialize(model, seed: int) -> None:
    """Fresh random initial weights for every layer (same architecture), drawn with `seed`.

    Used by the random_reinit control. Layers whose initializers carry their own fixed seed would
    redraw their original values, which would make the control meaningless: that is an error.
    """
    keras = _keras()
    seeded = []
    for layer in keras_graph.all_layers(model):
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


def _stop_callback(stop: StopToken):
    keras = _keras()

    class StopOnRequest(keras.callbacks.Callback):
        """Checked after every batch: a stop request ends the epoch at once (it is dropped)."""

        def on_train_batch_end(self, batch, logs=None):
            stop.raise_if_requested("during an epoch")

    return StopOnRequest()


def _check_pruned_zero(model, mask: Mapping[str, np.ndarray], where: str) -> None:
    """Raise if a pruned weight is non-zero (before a checkpoint could keep it)."""
    revived = []
    for name, var in check_mask(model, mask).items():
        pruned = ~masks_mod.expand(mask[name], tuple(var.shape))
        if np.count_nonzero(var.numpy()[pruned]):
            revived.append(name)
    if revived:
        raise RuntimeError(f"{where}: pruned weights became non-zero during training in {revived}")


def train_masked(model, mask: Mapping[str, np.ndarray], train_data, validation_data=None, *,
                 optimizer, loss, epochs: int, metrics=("accuracy",),
                 learning_rate: Callable[[int], float | None] | None = None,
                 batch_size: int | None = None, label: str = "masked",
                 checkpoint: EpochCheckpoint | None = None,
                 stop: StopToken | None = None) -> dict[str, list[float]]:
    """Apply `mask`, compile `model` with the masked optimizer and train `epochs` epochs.

    `train_data`: (x, y) arrays, a dataset of (x, y) batches, or a callable epoch -> either (so a
    run can reproduce the dense run's per-epoch shuffling). `learning_rate`: epoch -> rate (None
    keeps the optimizer's), set between epochs as the dense driver does. One Keras fit per epoch:
    the compiled step is traced once and reused. Returns the per-epoch history (Keras' metric
    names plus 'lr' and 'time'). Raises RuntimeError if a pruned weight is non-zero after an epoch.

    `checkpoint`: save every complete epoch there and resume from it (see EpochCheckpoint); it is
    kept when training completes. `stop`: once requested, Preempted is raised after the current
    batch (module docstring).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    apply_mask(model, mask)
    opt = masked_optimizer(optimizer, model, mask)
    model.compile(optimizer=opt, loss=loss, metrics=list(metrics))
    history: dict[str, list[float]] = {}
    start = 0
    if checkpoint is not None:
        resumed = checkpoint.load(model, opt)
        if resumed is not None:
            start, history = resumed
            log.info("%s resumed after epoch %d/%d from %s", label, start, epochs, checkpoint.directory)
    if start > epochs:
        raise ValueError(f"{checkpoint.state_path}: {start} epochs saved, more than the {epochs} asked for")
    callbacks = [_stop_callback(stop)] if stop is not None else []
    for epoch in tqdm(range(start, epochs), desc=label, unit="epoch", initial=start, total=epochs,
                      leave=False, disable=None):
        if stop is not None:
            stop.raise_if_requested(f"before epoch {epoch + 1} of {label}")
        if checkpoint is not None and checkpoint.seed is not None:
            # Each epoch's randomness (array shuffling, dropout draws) depends only on the epoch.
            _keras().utils.set_random_seed((int(checkpoint.seed) * 100_003 + epoch) % 2**32)
        lr = learning_rate(epoch) if learning_rate is not None else None
        if lr is not None:
            opt.learning_rate.assign(lr)
        data = train_data(epoch) if callable(train_data) else train_data
        x, y = data if isinstance(data, tuple) else (data, None)
        t0 = time.perf_counter()
        logs = model.fit(x, y, batch_size=batch_size, epochs=1, validation_data=validation_data,
                         verbose=0, callbacks=callbacks).history
        row = {k: float(v[-1]) for k, v in logs.items()}
        row["lr"] = float(np.asarray(opt.learning_rate))
        row["time"] = time.perf_counter() - t0
        for key, value in row.items():
            history.setdefault(key, []).append(value)
        _check_pruned_zero(model, mask, f"{label} epoch {epoch + 1}")
        if checkpoint is not None:
            checkpoint.save(model, opt, epoch + 1, history)
        log.info("%s epoch %d/%d (%.1fs) %s", label, epoch + 1, epochs, row["time"],
                 " ".join(f"{k}={v:.4g}" for k, v in sorted(row.items()) if k != "time"))
    return history
