"""BatchNorm recalibration: moving mean and variance recomputed from training batches.

Why: a BatchNorm layer normalises with batch statistics while training and with its moving
averages when evaluated. The averages lag the weights by ~1/(1 - momentum) steps and start at
(mean 0, variance 1); with Keras' 0.99 a run of a few hundred steps still evaluates with
statistics of earlier weights, averaging Elephas workers' weights leaves statistics that belong
to none of them, and applying a pruning mask changes every activation downstream. Evaluation
then sits at chance while training accuracy climbs (issue 13, item 6).

Method (exact pooled moments, "precise BN"): each layer's momentum is set to 0, so a forward pass
in training mode leaves the batch's own moments (mean, biased variance, as Keras computes them)
in the moving variables; after every batch we read them and accumulate, in float64,
sum n_b * mean_b and sum n_b * (var_b + mean_b^2). After B batches a layer gets
mean = S1 / N and var = S2 / N - mean^2: exactly the mean and variance of that layer's inputs
over all B batches pooled (upstream layers in training mode, as during training), not an
average of per-batch variances. Momenta are restored afterwards. Layers set non-trainable run in
inference mode in Keras 3 and keep their statistics. Kernels are not touched, so pruned weights
stay zero.

Where (the `bn_recalibration` setting, "auto" | "on" | "off"):
- dense runs (`evaluate_epoch`, called by the driver loop before each evaluation, hence also
  before the final model is saved): auto recalibrates models with BatchNorm when the elephas
  engine averages more than one worker, or when the momentum's window 1/(1 - m) exceeds half an
  epoch (the statistics an evaluation reads are then stale). The history row records
  bn_recalibrated = 1 and the validation accuracy before it.
- grid points (`recalibrate_point`): auto recalibrates every point of a BatchNorm model once
  retraining under its mask ends; the result records the accuracy before and after.
Data: the first `bn_recalibration_batches` batches of the epoch's own training pipeline (same
seed, epoch and augmentation), so a resumed run recalibrates exactly as an uninterrupted one.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import numpy as np

from train.models import DEFAULT_BN_MOMENTUM, has_batchnorm

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def bn_layers(model) -> list:
    """Every BatchNormalization layer of `model`, nested models included, that updates its
    statistics in training mode (trainable)."""
    import keras

    found, stack = [], list(getattr(model, "layers", ()))
    while stack:
        layer = stack.pop(0)
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.trainable:
                found.append(layer)
        stack[0:0] = list(getattr(layer, "layers", ()))
    return found


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def recalibrate(model, batches: Iterable, max_batches: int) -> int:
    """Set every BatchNorm layer's moving mean/variance to the pooled moments of its inputs over
    the first `max_batches` of `batches` ((x, y[, w]) tuples or x); returns the batches used."""
    if max_batches < 1:
        raise ValueError(f"bn_recalibration_batches must be >= 1, got {max_batches}")
    layers = bn_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    s1 = [np.zeros(layer.moving_mean.shape, np.float64) for layer in layers]
    s2 = [np.zeros(layer.moving_variance.shape, np.float64) for layer in layers]
    count, used = 0, 0
    try:
        for layer in layers:
            layer.momentum = 0.0   # read at call time: a forward pass stores the batch moments
        for batch in batches:
            if used >= max_batches:
                break
            x = _inputs(batch)
            n = int(np.shape(x)[0])
            model(x, training=True)
            for i, layer in enumerate(layers):
                mean = np.asarray(layer.moving_mean.numpy(), np.float64)
                var = np.asarray(layer.moving_variance.numpy(), np.float64)
                s1[i] += n * mean
                s2[i] += n * (var + mean * mean)
            count += n
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if not count:
        raise ValueError("bn_recalibration: no training batch to recalibrate on")
    for i, layer in enumerate(layers):
        mean = s1[i] / count
        var = np.maximum(s2[i] / count - mean * mean, 0.0)
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(var.astype(layer.moving_variance.dtype))
    return used


# ------------------------------------------------------------------------------------ dense runs
def dense_policy(settings, steps_per_epoch: int) -> tuple[bool, str]:
    """(recalibrate?, why) for a dense run's settings (see the module docstring)."""
    mode = settings.bn_recalibration
    if mode == "off" or not has_batchnorm(settings.model):
        return False, "off" if mode == "off" else "no BatchNorm"
    if mode == "on":
        return True, "bn_recalibration=on"
    if settings.engine == "elephas" and settings.workers > 1:
        return True, f"elephas averages {settings.workers} workers' statistics"
    momentum = float(settings.model_options.get("bn_momentum", DEFAULT_BN_MOMENTUM))
    window = 1.0 / (1.0 - momentum)
    if 2 * window > steps_per_epoch:
        return True, (f"momentum {momentum:g} averages ~{window:.0f} steps, more than half an "
                      f"epoch ({steps_per_epoch} steps)")
    return False, "moving statistics converge within an epoch"


def _replicas(engine) -> int:
    strategy = getattr(engine, "strategy", None)
    replicas = getattr(strategy, "num_replicas_in_sync", 1) if strategy is not None else 1
    return max(int(replicas), int(getattr(engine, "num_workers", 1)))


class EpochEvaluator:
    """engine.evaluate(), preceded by a recalibration where the policy asks for one."""

    def __init__(self, settings, info, engine):
        self.settings, self.info, self.engine = settings, info, engine
        self.enabled, why = dense_policy(settings, engine.steps_per_epoch)
        if self.enabled and _replicas(engine) > 1:
            # Mirrored variables cannot be assigned per replica from outside the strategy.
            log.warning("bn_recalibration: not supported under a %d-replica tf.distribute "
                        "strategy; moving statistics are left as trained", _replicas(engine))
            self.enabled = False
        log.info("BatchNorm recalibration before evaluations: %s (%s)",
                 "on" if self.enabled else "off", why)

    def _batches(self, epoch: int):
        from train.data import make_dataset

        s = self.settings
        return make_dataset(self.info, "train", batch_size=s.batch_size, training=True,
                            input_size=s.input_size, fmt=s.format, seed=s.seed, epoch=epoch,
                            cache=s.cache, augment=s.augment, shuffle_buffer=s.shuffle_buffer)

    def evaluate(self, epoch: int) -> dict[str, float]:
        if not self.enabled:
            return self.engine.evaluate()
        before = self.engine.evaluate()
        used = recalibrate(self.engine.model, self._batches(epoch),
                           self.settings.bn_recalibration_batches)
        after = self.engine.evaluate()
        log.info("epoch %d: BatchNorm recalibrated on %d batches: val_accuracy %.4f -> %.4f",
                 epoch + 1, used, before.get("val_accuracy", float("nan")),
                 after.get("val_accuracy", float("nan")))
        return {**after, "bn_recalibrated": 1.0,
                "val_accuracy_before_bn_recalibration": before.get("val_accuracy", float("nan"))}


# ----------------------------------------------------------------------------------- grid points
def point_policy(mode: str, model) -> bool:
    if mode not in MODES:
        raise ValueError(f"bn_recalibration: {mode!r} is not one of {', '.join(MODES)}")
    return mode != "off" and bool(bn_layers(model))


def _batched(data, batch_size: int | None):
    """Batches of (x, y) arrays, a dataset, or either from a callable(epoch)."""
    if isinstance(data, tuple):
        x, y = data
        size = batch_size or 32
        return ((x[i:i + size], y[i:i + size]) for i in range(0, len(x), size))
    return data


def evaluate_data(model, data, batch_size: int | None = None) -> dict[str, float]:
    """model.evaluate on (x, y) arrays or a dataset, as a dict of metric names."""
    if isinstance(data, tuple):
        x, y = data
        return model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    return model.evaluate(data, verbose=0, return_dict=True)


def recalibrate_point(model, train_data, validation_data, *, epoch: int, batches: int,
                      batch_size: int | None = None, evaluate_before: bool = True
                      ) -> dict[str, Any]:
    """Recalibrate a retrained point on `batches` batches of its training data of `epoch` and
    evaluate it: {"before": metrics or None, "after": metrics, "batches": used}."""
    before = evaluate_data(model, validation_data, batch_size) if evaluate_before else None
    data = train_data(epoch) if callable(train_data) else train_data
    used = recalibrate(model, _batched(data, batch_size), batches)
    after = evaluate_data(model, validation_data, batch_size)
    return {"before": before, "after": after, "batches": used}
