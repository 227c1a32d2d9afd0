"""The `elephas` engine: synchronous data-parallel training rounds on Spark, driven by the driver.

Public API (stable; `train/engines.py` and `bench/train_throughput.py` call it):

    engine = SparkDataParallel(spark, model_factory, optimizer_factory, compile_kwargs,
                               dataset_factory, workers, averaging_steps=None, gpus_per_task=0,
                               *, shards=None, model_key=None, max_fan_in=8)
    weights, optimizer_state = engine.initial_state()        # or take them from a checkpoint
    result = engine.run_round(weights, optimizer_state, lr=0.1, steps=None, round_index=epoch,
                              seed=run_seed, start_step=None)
    # RoundResult(weights, optimizer_state, metrics, records)
    engine.close()

- `model_factory()` returns a built Keras model; `optimizer_factory()` a fresh optimizer;
  `compile_kwargs` go to `model.compile` (loss, metrics, ...). They are cloudpickled once and
  unpickled on executors only after the task's GPU is pinned, so their modules may import Keras.
- `dataset_factory(shard_files=, worker_index=, num_workers=, seed=)` (keywords) returns a batched
  `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)` for one worker (e.g. a partial of
  `train.data.make_dataset`). It is streamed batch by batch, never materialised.
- `shards`: a flat list of shard paths (dealt round-robin: worker i gets `shards[i::workers]`), or
  one list per worker, or None (every worker gets `[]` and the factory shards by worker_index).
- Round length: `steps` if given, else `averaging_steps` (K), else one pass over the worker's
  shards. One-pass rounds ("epoch" averaging) read a fresh pass shuffled with
  `round_seed(seed, round_index)`. K-step rounds read each worker's endless stream
  `dataset_factory(..., seed).repeat()` from position `start_step` (default `round_index * K`),
  so keep `seed` fixed within a run and consecutive rounds continue through the data.
- Seeds: the factory is called right after `keras.utils.set_random_seed(<its seed argument>)`
  (tf.data op seeds mix in the global seed), so a single-process run reproduces a worker's batches
  by doing the same; TF random ops during the steps are seeded by
  `round_seed(seed, round_index, worker_index)`. A round is a function of its inputs alone.
- `optimizer_state` is `[v.numpy() for v in optimizer.variables]` (iterations, learning rate,
  slots); `optimizer_state=None`/`[]` means a fresh optimizer. `lr` (if not None) sets the
  optimizer's learning rate for the round; with a LearningRateSchedule pass `lr=None`.
- Averaging: float arrays (weights and optimizer slots alike) become
  `base - sum_i (n_i / N) * (base - w_i)`, n_i = records worker i trained on; integer arrays
  (optimizer iterations) advance by the largest worker advance, i.e. the round's number of
  synchronous global steps, so step-based schedules continue as in single-process training.
  It is reduced on the executors in a fixed tree of fan-in <= `max_fan_in`
  (`train.state_reduce`, which states the arithmetic and its tolerance against the driver-side
  `average_states`): the driver receives one state per round, whatever the number of workers.
  `reference_round` (tests and bench/elephas_scaling.py only) is the former way: every worker's
  state collected and averaged on the driver.
- Before round 0 (`check_driver_memory`, `train.driver_memory`): a state that cannot fit the
  driver's heap or spark.driver.maxResultSize raises DriverMemoryError naming the setting.
- `metrics`: record-weighted means of the compiled metrics ("loss", ...), "records", "steps",
  "round_s" (driver wall time), "train_s" (slowest worker's time inside training steps),
  "fixed_cost_s" = round_s - train_s (scheduling, broadcast, set-up, averaging, collect),
  "averaging_s" (the driver's share after the job), "merge_s" (the executors' merging along the
  slowest path of the tree), "reduce_levels", "reduce_fan_in", "driver_s" (before the Spark job),
  "spark_s" (the job: training, tree, collect), "driver_bytes_received" (array bytes plus the
  pickled reports collected), "driver_peak_bytes" (the most the driver's Python side held at once
  during the round beyond what it held before, by tracemalloc: Python objects and NumPy buffers),
  "model_builds" (models built this round), and "workers": one report per worker (pid, builds of
  this model in that Python worker, built_now, setup_s, train_s, skipped_steps, gpu_assigned,
  gpu_visible, and "phases": model_s, load_state_s, data_s, first_batch_s).
  `engine.round_history` keeps the latest rounds' metrics.

What we take from elephas 7.3 and what we changed (stock `SparkModel`/`SparkWorker`, synchronous):
- kept: the synchronous scheme (broadcast parameters, `mapPartitions` one task per worker, then
  average), and `elephas.utils.serialization.weights_to_bytes/bytes_to_weights` for the broadcast
  (self-describing, dtype-preserving, no pickle). Worker states travel as NumPy arrays in Spark's
  own pickles, through the averaging tree; stock elephas `collect`s every worker's weights and
  averages on the driver (`subtract_params`), O(workers) states through the driver per round.
- the RDD holds `(worker_index, shard_files)`, one per partition; workers stream their shards
  through tf.data instead of `np.asarray` over a whole partition of records.
- the driver owns the loop: one Spark job per round; learning rate, evaluation, history,
  checkpoints and callbacks stay on the driver. Workers run `train_on_batch` only (stock elephas
  passes `callbacks` into `fit` on the executors).
- the optimizer state is shipped and averaged with the weights (stock elephas deserialises a fresh
  optimizer each epoch, so momentum and step-based schedules restart).
- deltas are weighted by records trained (stock elephas: plain mean over workers).
- the compiled model is cached per Python worker (`train.spark_worker._MODELS`, needs
  `spark.python.worker.reuse=true`); stock elephas rebuilds and recompiles it every epoch.
  Spark kills Python workers idle for more than a minute (hard-coded in PythonWorkerFactory), so
  a driver pause longer than that between rounds costs a rebuild; `metrics["model_builds"]` shows it.
- a worker sets and reads all weights and optimizer variables in one TensorFlow call each
  (`train.spark_worker.StateIO`) instead of one eager op per variable (Keras' set/get_weights).
- K-step rounds keep each worker's data stream (the built tf.data pipeline and its position) in
  the Python worker, keyed by what determines it; a stream another Python worker got ahead of
  catches up by the missed steps. One-pass rounds build their pipeline per round (its shuffle
  seed is the round's); the encoded-bytes cache and the traced decode function under it persist.
- elephas' `weights_to_bytes` turns 0-d arrays (iterations, learning rate) into shape (1,);
  shapes are restored against the model (`restore_shapes`).
- averaging every K steps as well as every pass (stock synchronous mode: one epoch per job).
- each task pins the GPU Spark assigned it before importing TensorFlow (stock: none).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from train import driver_memory
from train.driver_memory import DriverMemoryError, DriverPeak, received_bytes
from train.keras_internals import raw_learning_rate
from train.spark_worker import RoundConfig, WorkerSpec, build_compiled, restore_shapes, round_seed, run_task
from train.state_reduce import MAX_FAN_IN, reduce_on_executors, tree_shape

log = logging.getLogger(__name__)

DISCOVERY_SCRIPT = Path(__file__).with_name("gpu_discovery.sh")

__all__ = ["SparkDataParallel", "RoundResult", "average_states", "round_seed", "gpu_spark_conf",
           "DISCOVERY_SCRIPT", "DriverMemoryError"]


@dataclasses.dataclass
class RoundResult:
    weights: list[np.ndarray]
    optimizer_state: list[np.ndarray]
    metrics: dict[str, Any]
    records: int


def gpu_spark_conf(gpus_per_executor: int = 4, gpus_per_task: int = 1,
                   discovery_script: str | Path = DISCOVERY_SCRIPT) -> dict[str, str]:
    """Spark settings that give each training task its own GPU (pass to get_spark or --conf)."""
    if gpus_per_executor < 1 or gpus_per_task < 1:
        raise ValueError("gpus_per_executor and gpus_per_task must be at least 1")
    return {
        "spark.executor.resource.gpu.amount": str(gpus_per_executor),
        "spark.executor.resource.gpu.discoveryScript": str(discovery_script),
        "spark.task.resource.gpu.amount": str(gpus_per_task),
    }


def average_states(base: Sequence[np.ndarray], states: Sequence[Sequence[np.ndarray]],
                   records: Sequence[int]) -> list[np.ndarray]:
    """Merge worker states that all started from `base`, weighting each delta by its records.

    The driver-side reference for `train.state_reduce` (rounds reduce on the executors).
    Floats: base minus the record-weighted mean delta (float64 accumulation). Integers (step
    counters): base plus the largest advance, since workers step in parallel.
    """
    from elephas.utils.functional_utils import subtract_params

    if len(states) != len(records):
        raise ValueError("states and records differ in length")
    total = int(sum(records))
    if total <= 0:
        raise ValueError("no worker trained on any record: are the shards empty?")
    deltas = [(subtract_params(base, s), n) for s, n in zip(states, records)]
    merged = []
    for j, b in enumerate(base):
        b = np.asarray(b)
        if np.issubdtype(b.dtype, np.integer) or b.dtype == np.bool_:
            advance = np.max(np.stack([-d[j] for d, _ in deltas]), axis=0)
            merged.append((b + advance).astype(b.dtype))
            continue
        acc = np.zeros(b.shape, dtype=np.float64)
        for d, n in deltas:
            if n:
                acc += (n / total) * d[j].astype(np.float64)
        merged.append((b.astype(np.float64) - acc).astype(b.dtype))
    return merged


def _deal_shards(shards, workers: int) -> list[list[str]]:
    if shards is None:
        return [[] for _ in range(workers)]
    shards = list(shards)
    if shards and all(isinstance(s, (list, tuple)) for s in shards):
        if len(shards) != workers:
            raise ValueError(f"shards: {len(shards)} per-worker lists for workers={workers}")
        return [[str(p) for p in part] for part in shards]
    if any(isinstance(s, (list, tuple)) for s in shards):
        raise ValueError("shards: give either a flat list of paths or one list per worker")
    if len(shards) < workers:
        raise ValueError(f"shards: {len(shards)} shard files cannot feed workers={workers}; "
                         "use fewer workers or pass shards=None and let the factory split records")
    return [[str(p) for p in shards[i::workers]] for i in range(workers)]


def _int_arg(name: str, value, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


class SparkDataParallel:
    """Synchronous data-parallel rounds over `workers` Spark tasks; see the module docstring."""

    MAX_HISTORY = 1000

    def __init__(self, spark, model_factory: Callable[[], Any], optimizer_factory: Callable[[], Any],
                 compile_kwargs: dict | None, dataset_factory: Callable[..., Any], workers: int,
                 averaging_steps: int | None = None, gpus_per_task: int = 0, *,
                 shards: Sequence[str] | Sequence[Sequence[str]] | None = None,
                 model_key: str | None = None, max_fan_in: int = MAX_FAN_IN):
        from pyspark import cloudpickle

        self.sc = getattr(spark, "sparkContext", spark)
        self.workers = _int_arg("workers", workers, 1)
        self.averaging_steps = _int_arg("averaging_steps", averaging_steps, 1, allow_none=True)
        self.gpus_per_task = _int_arg("gpus_per_task", gpus_per_task, 0)
        self.max_fan_in = _int_arg("max_fan_in", max_fan_in, 2)
        self.reduce_fan_in, self.reduce_levels = tree_shape(self.workers, self.max_fan_in)
        self.driver_plan: dict | None = None   # check_driver_memory's figures, once checked
        compile_kwargs = dict(compile_kwargs or {})
        if "optimizer" in compile_kwargs:
            raise ValueError("compile_kwargs: pass the optimizer through optimizer_factory")
        self.shard_lists = _deal_shards(shards, self.workers)
        conf = self.sc.getConf()
        if self.gpus_per_task and not conf.get("spark.task.resource.gpu.amount", None):
            raise ValueError(f"gpus_per_task={self.gpus_per_task} needs spark.task.resource.gpu.amount "
                             "(see gpu_spark_conf())")
        if conf.get("spark.python.worker.reuse", "true").lower() != "true":
            log.warning("spark.python.worker.reuse is off: every round rebuilds the model")
        if self.workers > self.sc.defaultParallelism:
            log.warning("workers=%d exceeds Spark's %d task slots: rounds run in waves",
                        self.workers, self.sc.defaultParallelism)

        self._spec = WorkerSpec(model_factory, optimizer_factory, compile_kwargs, dataset_factory,
                                self.workers)
        blob = cloudpickle.dumps(self._spec)
        self.model_key = model_key or "model-" + hashlib.sha256(
            cloudpickle.dumps((model_factory, optimizer_factory, compile_kwargs))).hexdigest()[:16]
        self._data_key = hashlib.sha256(cloudpickle.dumps(dataset_factory)).hexdigest()[:16]
        self._spec_key = hashlib.sha256(blob).hexdigest()[:16]
        # The factories travel once per engine, as bytes: unpickled on executors after GPU pinning.
        self._spec_broadcast = self.sc.broadcast(blob)
        self._rdd = self.sc.parallelize(list(enumerate(self.shard_lists)), self.workers)
        self._fresh_optimizer_state: list[np.ndarray] | None = None
        # Metrics of the latest rounds (no arrays), for benchmarks and diagnostics.
        self.round_history: list[dict[str, Any]] = []
        self._has_schedule: bool | None = None

    def initial_state(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Weights and optimizer state of a freshly built model (built on the driver)."""
        model = build_compiled(self._spec)
        return model.get_weights(), [np.asarray(v.numpy()) for v in model.optimizer.variables]

    def _optimizer_has_schedule(self) -> bool:
        # Checked on the driver so the error comes before any Spark job (executors check too).
        if self._has_schedule is None:
            rate = raw_learning_rate(self._spec.optimizer_factory())
            self._has_schedule = not hasattr(rate, "assign")
        return self._has_schedule

    def _fresh_optimizer(self) -> list[np.ndarray]:
        if self._fresh_optimizer_state is None:
            self._fresh_optimizer_state = self.initial_state()[1]
        return self._fresh_optimizer_state

    def check_driver_memory(self, state_bytes: int) -> dict:
        """Before round 0: DriverMemoryError if a round of `state_bytes` of weights + optimizer
        state cannot fit the driver (train.driver_memory); a warning if it may not."""
        self.driver_plan = driver_memory.check(self.sc, state_bytes, self.workers)
        return self.driver_plan

    def _launch(self, weights, optimizer_state, lr, steps, round_index, seed, start_step):
        """Checked arguments, then the round's broadcast and its RDD of (worker_index, leaf)."""
        from elephas.utils.serialization import weights_to_bytes

        steps = _int_arg("steps", steps, 1, allow_none=True)
        round_index = _int_arg("round_index", round_index, 0)
        seed = _int_arg("seed", seed, 0)
        if lr is not None and not (np.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr: expected a finite number >= 0, got {lr!r}")
        if lr is not None and self._optimizer_has_schedule():
            raise ValueError("lr: the optimizer has a learning-rate schedule; pass lr=None and let "
                             "the schedule (driven by the shipped iterations) set it")
        steps = steps if steps is not None else self.averaging_steps
        if steps is None:
            if start_step is not None:
                raise ValueError("start_step: only meaningful for K-step rounds (steps or averaging_steps)")
            data_seed, start = round_seed(seed, round_index), 0
        else:
            start = round_index * steps if start_step is None else _int_arg("start_step", start_step, 0)
            data_seed = seed

        weights = [np.asarray(w) for w in weights]
        opt_state = [np.asarray(v) for v in optimizer_state] if optimizer_state else self._fresh_optimizer()
        base = weights + list(opt_state)
        if self.driver_plan is None:
            self.check_driver_memory(sum(b.nbytes for b in base))
        cfg = RoundConfig(model_key=self.model_key, data_key=self._data_key, lr=lr, steps=steps,
                          start_step=start, round_index=round_index, seed=data_seed, run_seed=seed,
                          n_weights=len(weights), gpus_per_task=self.gpus_per_task)
        # The serialised state is not kept on the driver once the broadcast has it.
        state_bc = self.sc.broadcast(weights_to_bytes(base))
        self.sc.setJobDescription(f"elephas round {round_index} ({self.workers} workers)")
        leaves = self._rdd.mapPartitions(functools.partial(
            run_task, self._spec_key, self._spec_broadcast, cfg, state_bc))
        return base, len(weights), state_bc, leaves

    def run_round(self, weights: Sequence[np.ndarray], optimizer_state: Sequence[np.ndarray] | None,
                  *, lr: float | None, steps: int | None, round_index: int, seed: int,
                  start_step: int | None = None) -> RoundResult:
        """One synchronous round: broadcast, train on every worker, average on the executors."""
        t_round = time.perf_counter()
        with DriverPeak() as peak:
            base, n_weights, state_bc, leaves = self._launch(weights, optimizer_state, lr, steps,
                                                             round_index, seed, start_step)
            t_job = time.perf_counter()
            try:
                results = reduce_on_executors(leaves, self.workers, self.max_fan_in).collect()
            finally:
                state_bc.destroy()
            t_avg = time.perf_counter()
            if len(results) != 1:
                raise RuntimeError(f"round {round_index}: the averaging tree returned "
                                   f"{len(results)} results, expected 1")
            result = results[0]
            reports = result["reports"]
            self._check_reports(reports, round_index)
            if result["arrays"] is None:
                raise ValueError("no worker trained on any record: are the shards empty?")
            merged = restore_shapes(result["arrays"], [b.shape for b in base], "averaged state")
            received = received_bytes(merged, reports)
        return self._result(round_index, merged, n_weights, reports, {
            "driver_s": t_job - t_round, "spark_s": t_avg - t_job,
            "averaging_s": time.perf_counter() - t_avg, "merge_s": result["merge_s"],
            "reduce_levels": len(self.reduce_levels), "reduce_fan_in": self.reduce_fan_in,
            "driver_bytes_received": received, "driver_peak_bytes": peak.bytes}, t_round)

    def reference_round(self, weights: Sequence[np.ndarray],
                        optimizer_state: Sequence[np.ndarray] | None, *, lr: float | None,
                        steps: int | None, round_index: int, seed: int,
                        start_step: int | None = None) -> tuple[RoundResult, list, list[int]]:
        """Reference only (tests, bench/elephas_scaling.py): the same round with every worker's
        state collected and averaged on the driver (`average_states`), O(workers) states through
        the driver. Returns (result, the workers' states, their records)."""
        t_round = time.perf_counter()
        with DriverPeak() as peak:
            base, n_weights, state_bc, leaves = self._launch(weights, optimizer_state, lr, steps,
                                                             round_index, seed, start_step)
            t_job = time.perf_counter()
            try:
                collected = leaves.collect()
            finally:
                state_bc.destroy()
            t_avg = time.perf_counter()
            collected.sort(key=lambda item: item[0])
            reports = [p.reports[0] for _, p in collected]
            self._check_reports(reports, round_index)
            states = [restore_shapes(p.arrays, [b.shape for b in base], f"worker {i}")
                      for i, p in collected]
            records = [p.records for _, p in collected]
            merged = average_states(base, states, records)
            received = sum(received_bytes(s, r) for s, r in zip(states, reports))
        result = self._result(round_index, merged, n_weights, reports, {
            "driver_s": t_job - t_round, "spark_s": t_avg - t_job,
            "averaging_s": time.perf_counter() - t_avg, "merge_s": 0.0, "reduce_levels": 0,
            "reduce_fan_in": self.workers, "driver_bytes_received": received,
            "driver_peak_bytes": peak.bytes}, t_round)
        return result, states, records

    def _check_reports(self, reports: list[dict], round_index: int) -> None:
        got = [r["worker_index"] for r in reports]
        if got != list(range(self.workers)):
            raise RuntimeError(f"round {round_index}: got reports from workers {got}, "
                               f"expected {self.workers}")

    def _result(self, round_index: int, merged: list, n_weights: int, reports: list[dict],
                timings: dict[str, Any], t_round: float) -> RoundResult:
        total = int(sum(r["records"] for r in reports))
        metrics: dict[str, Any] = {}
        for name in sorted({k for r in reports for k in r["metrics"]}):
            metrics[name] = sum(r["metrics"].get(name, 0.0) * r["records"] for r in reports) / total
        round_s = time.perf_counter() - t_round
        train_s = max(r["train_s"] for r in reports)
        metrics.update(timings)
        metrics.update({
            "records": total,
            "steps": max(r["steps"] for r in reports),
            "round_s": round_s,
            "train_s": train_s,
            "fixed_cost_s": max(round_s - train_s, 0.0),
            "model_builds": sum(bool(r["built_now"]) for r in reports),
            "workers": reports,
        })
        self.round_history.append({k: v for k, v in metrics.items()})
        del self.round_history[:-self.MAX_HISTORY]
        log.info("round %d: %d records, %d steps, loss %.4g, %.2fs (fixed cost %.2fs); driver "
                 "received %.1f MiB, peak %.1f MiB", round_index, total, metrics["steps"],
                 metrics.get("loss", float("nan")), round_s, metrics["fixed_cost_s"],
                 timings["driver_bytes_received"] / 2**20, timings["driver_peak_bytes"] / 2**20)
        return RoundResult(merged[:n_weights], merged[n_weights:], metrics, total)

    def close(self) -> None:
        """Release the engine's broadcast (workers' cached models stay until evicted)."""
        self._spec_broadcast.destroy()

