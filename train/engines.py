"""The engines the dense driver loop runs, and the one interface they share.

`local` and `multiworker` are `train.local_engine.LocalEngine` (Keras under tf.distribute);
`elephas` is `ElephasEngine` here, the driver side of the Spark rounds of
`train.elephas_engine.SparkDataParallel`. Engines only train, one epoch at a time, pausing at the
exact global steps the driver names; the driver (`train.run`) owns epochs, the learning rate,
evaluation, history and checkpoints.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Protocol, Sequence

from common.spark import get_spark
from train.data import DatasetInfo, make_dataset
from train.elephas_engine import DriverMemoryError, SparkDataParallel
from train.local_engine import (
    LocalEngine,
    applied_steps,
    compile_kwargs,
    evaluate_model,
    model_builder,
    optimizer_builder,
)
from train.settings import DenseSettings
from train.spark_worker import StateIO

log = logging.getLogger(__name__)


class Engine(Protocol):
    model: Any              # compiled; the driver checkpoints and evaluates it
    is_chief: bool          # the process that writes the run directory
    steps_per_epoch: int

    def train_epoch(self, epoch: int, lr: float, stops: Sequence[int] = (),
                    at_stop: Callable[[int], None] | None = None) -> dict[str, float]:
        """Train epoch `epoch` (0-based) at rate `lr`, calling at_stop(step) after each global
        step in `stops`; returns the epoch's training metrics (loss, accuracy, images_per_s)."""

    def evaluate(self) -> dict[str, float]:
        """val_loss and val_accuracy over the whole validation split."""

    def close(self) -> None: ...


def make_engine(settings: DenseSettings, info: DatasetInfo, spark=None) -> Engine:
    if settings.engine in ("local", "multiworker"):
        return LocalEngine(settings, info, multiworker=settings.engine == "multiworker")
    return ElephasEngine(settings, info, spark=spark)


def steps_per_epoch(settings: DenseSettings, info: DatasetInfo) -> int | None:
    """Optimizer steps per epoch as the engine will count them (None: known once the
    multiworker cluster is up). elephas: one pass of the worker with the most records."""
    if settings.engine == "local":
        return info.steps("train", settings.batch_size, fmt=settings.format)
    if settings.engine == "elephas":
        records = [info.worker_records("train", w, settings.workers, settings.format)
                   for w in range(settings.workers)]
        if min(records) < 1:
            raise ValueError(f"workers: {settings.workers} workers leave worker "
                             f"{records.index(min(records))} without training records")
        return max(math.ceil(r / settings.batch_size) for r in records)
    return None


class ElephasEngine:
    """Driver side of the elephas engine: rounds of `train.elephas_engine.SparkDataParallel`.

    averaging=epoch: one round is one pass of every worker over its shards. averaging=K: rounds
    of K steps on each worker's endless stream, also cut at epoch ends and rewind points so the
    driver holds the averaged weights exactly there. The driver keeps a compiled model with the
    averaged weights and optimizer state for evaluation, checkpoints and resume.
    """

    def __init__(self, settings: DenseSettings, info: DatasetInfo, spark=None):
        self.settings, self.info, self.is_chief = settings, info, True
        self.steps_per_epoch = steps_per_epoch(settings, info)
        if spark is None:
            spark = get_spark("bigticket-train", settings.master)
        files = [str(f.path) for f in info.shard_files("train", settings.format)]
        by_file = len(files) >= settings.workers  # same rule as train.data.make_dataset
        s = settings
        kwargs = dict(batch_size=s.batch_size, training=True, input_size=s.input_size,
                      fmt=s.format, cache=s.cache, augment=s.augment,
                      shuffle_buffer=s.shuffle_buffer)

        self.averaging = None if s.averaging == "epoch" else int(s.averaging)
        # K-step rounds read an endless stream: make it reshuffle on each pass over the shards.
        kwargs["repeat"] = self.averaging is not None

        def dataset_factory(shard_files, worker_index, num_workers, seed):
            if shard_files:  # this worker's own files
                return make_dataset(info, "train", shard_files=shard_files, seed=seed, **kwargs)
            return make_dataset(info, "train", worker_index=worker_index,
                                num_workers=num_workers, seed=seed, **kwargs)

        # GPUs per task as Spark schedules them (spark.task.resource.gpu.amount, e.g. from
        # spark-submit --conf); 0 on CPU-only clusters, where tasks leave devices alone.
        amount = spark.sparkContext.getConf().get("spark.task.resource.gpu.amount", "0")
        gpus_per_task = max(0, math.ceil(float(amount)))  # a shared GPU (0.25) still needs pinning
        # The tasks' devices set the precision, for the driver's copy too (same variables).
        model_factory = model_builder(s, info.num_classes, devices=["GPU"] if gpus_per_task else ["CPU"])
        optimizer_factory = optimizer_builder(s, gmp=True)  # growing masks when GMP is on
        self.dp = SparkDataParallel(spark, model_factory, optimizer_factory,
                                    compile_kwargs(info.num_classes),
                                    dataset_factory, s.workers, averaging_steps=self.averaging,
                                    gpus_per_task=gpus_per_task, shards=files if by_file else None)
        self.model = model_factory()
        self.model.compile(optimizer=optimizer_factory(), **compile_kwargs(info.num_classes))
        self.model.optimizer.build(self.model.trainable_variables)
        self._io = None   # StateIO of self.model, made on the first round
        # Refused here (DriverMemoryError), before the run directory or any round, when a
        # round's state cannot fit the driver's Spark settings.
        state_bytes = sum(int(v.numpy().nbytes) for v in
                          list(self.model.weights) + list(self.model.optimizer.variables))
        try:
            self.dp.check_driver_memory(state_bytes)
        except DriverMemoryError:
            self.dp.close()
            raise
        log.info("engine elephas: %d workers, %s shards, %d steps per epoch, averaging %s",
                 s.workers, "by file" if by_file else "by record", self.steps_per_epoch,
                 s.averaging)

    def _round(self, lr: float, steps: int | None, round_index: int, start_step: int | None):
        # One traced read and one traced assign for all ~400 variables instead of one eager op
        # each (the driver's share of a round's fixed cost); made on first use, after any resume
        # has loaded into the same variables.
        if self._io is None:
            self._io = StateIO(self.model)
        io = self._io
        state = io.read()
        result = self.dp.run_round(state[:io.n_weights], state[io.n_weights:], lr=lr, steps=steps,
                                   round_index=round_index, seed=self.settings.seed,
                                   start_step=start_step)
        io.load(result.weights, result.optimizer_state)
        return result

    def train_epoch(self, epoch: int, lr: float, stops: Sequence[int] = (),
                    at_stop: Callable[[int], None] | None = None) -> dict[str, float]:
        spe = self.steps_per_epoch
        applied0 = applied_steps(self.model)  # iterations average to the largest worker's
        t0 = time.perf_counter()
        results = []
        if self.averaging is None:
            results.append(self._round(lr, None, epoch, None))
            if at_stop is not None and (epoch + 1) * spe in stops:
                at_stop((epoch + 1) * spe)
        else:
            step, end = epoch * spe, (epoch + 1) * spe
            while step < end:
                k = self.averaging
                cut = min([end, (step // k + 1) * k] + [s for s in stops if s > step])
                results.append(self._round(lr, cut - step, step // k, step))
                step = cut
                if at_stop is not None and step in stops:
                    at_stop(step)
        records = sum(r.records for r in results)
        metrics = {name: sum(r.metrics[name] * r.records for r in results) / records
                   for name in ("loss", "accuracy", "top5_accuracy")
                   if all(name in r.metrics for r in results)}
        elapsed = time.perf_counter() - t0
        metrics["images_per_s"] = records / elapsed if elapsed > 0 else 0.0
        metrics["round_fixed_cost_s"] = sum(r.metrics["fixed_cost_s"] for r in results) / len(results)
        # Steps loss scaling skipped on the worker that applied the most (mixed_float16).
        metrics["skipped_steps"] = max(0, spe - (applied_steps(self.model) - applied0))
        return metrics

    def evaluate(self) -> dict[str, float]:
        return evaluate_model(self.model, self.settings, self.info)

    def close(self) -> None:
        self.dp.close()
