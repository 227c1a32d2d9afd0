"""Executor side of the `elephas` engine: one Spark task trains one worker's share of one round
and emits its state as a leaf of the averaging tree (`train.state_reduce`).

Runs inside PySpark's Python workers. Nothing here imports TensorFlow at module import time: the
task first pins the GPU Spark assigned it (CUDA_VISIBLE_DEVICES must be set before TensorFlow is
first imported in the process), and only then unpickles the model/optimizer/data factories (whose
modules may import Keras) and imports TensorFlow.

Module-level caches live as long as the Python worker (`spark.python.worker.reuse=true`):
- `_MODELS`: built + compiled model and optimizer per model key, so a round only sets weights;
- `_STREAMS`: each worker's data iterator in K-step mode with its position, keyed by what
  determines the stream (dataset factory, worker index and count, shard files, seed), so the next
  round continues where the last stopped instead of rebuilding the pipeline.
A Spark task may land on any idle Python worker: a stream left behind by the rounds another
Python worker served catches up by the steps it missed; a cache miss rebuilds the stream and
skips to the requested position (deterministic, just slower; both counted in the report).
One-pass ("epoch") rounds build their pipeline per round: its shuffle seed is the round's.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from common.cluster import claim_gpus, node_gpus
from common.native_logs import quiet_tensorflow
from train.faults import armed_fault, kill_this_worker
from train.keras_internals import raw_learning_rate, seed_all
from train.state_reduce import Partial, leaf

log = logging.getLogger(__name__)

# Keep few entries: each model holds its variables, each stream its shuffle/prefetch buffers.
MAX_CACHED_MODELS = 2
MAX_CACHED_STREAMS = 8


@dataclass
class WorkerSpec:
    """What every task of an engine needs besides the round's state (cloudpickled once per engine)."""

    model_factory: Callable[[], Any]
    optimizer_factory: Callable[[], Any]
    compile_kwargs: dict
    dataset_factory: Callable[[Sequence[str], int, int, int], Any]
    num_workers: int


@dataclass
class RoundConfig:
    """Per-round scalars; the arrays travel in a broadcast."""

    model_key: str
    data_key: str
    lr: float | None
    steps: int | None          # None: one pass over the worker's shards
    start_step: int            # K-step mode: position in the worker's repeated stream
    round_index: int
    seed: int                  # passed to dataset_factory (already derived for one-pass rounds)
    run_seed: int              # the caller's seed: with round and worker index, seeds TF ops
    n_weights: int
    gpus_per_task: int = 0     # here, not in WorkerSpec: needed before the spec may be unpickled


class StateIO:
    """A compiled model's weights and optimizer variables, set or read in one TensorFlow call.

    Per-variable eager assigns and reads (Keras' set_weights/get_weights) dispatch one op each:
    a small MobileNetV2 with momentum has ~400 variables, and on a busy machine that was the
    largest part of a round's set-up (bench/train_throughput.py, part c).
    """

    def __init__(self, model):
        import tensorflow as tf

        self.n_weights = len(model.weights)
        variables = list(model.weights) + list(model.optimizer.variables)
        self.shapes = [tuple(int(d) for d in v.shape) for v in variables]

        @tf.function(autograph=False)
        def assign(values):
            for variable, value in zip(variables, values):
                variable.assign(value)

        @tf.function(autograph=False)
        def read():
            return [tf.identity(v.value) for v in variables]

        self._assign, self._read = assign, read

    def load(self, weights: Sequence, optimizer_state: Sequence) -> None:
        if len(weights) != self.n_weights:
            raise ValueError(f"weights: got {len(weights)} arrays, the model has {self.n_weights}")
        if len(optimizer_state) != len(self.shapes) - self.n_weights:
            raise ValueError(f"optimizer_state: got {len(optimizer_state)} arrays, the optimizer "
                             f"has {len(self.shapes) - self.n_weights} variables")
        values = (restore_shapes(weights, self.shapes[:self.n_weights], "weights")
                  + restore_shapes(optimizer_state, self.shapes[self.n_weights:], "optimizer_state"))
        self._assign(values)

    def read(self) -> list:
        """Weights then optimizer variables, as NumPy arrays."""
        return [t.numpy() for t in self._read()]


@dataclass
class _CachedModel:
    model: Any
    builds: int = 1
    build_s: float = 0.0
    io: StateIO | None = None   # made on first use, kept with the model


@dataclass
class _Stream:
    iterator: Iterator
    position: int


_MODELS: "collections.OrderedDict[str, _CachedModel]" = collections.OrderedDict()
_STREAMS: "collections.OrderedDict[tuple, _Stream]" = collections.OrderedDict()
_SPECS: "collections.OrderedDict[str, WorkerSpec]" = collections.OrderedDict()
_PINNED_GPUS: str | None = None   # the CUDA_VISIBLE_DEVICES this process's TensorFlow was started with
_BUILD_COUNTS: dict[str, int] = collections.defaultdict(int)


def round_seed(seed: int, round_index: int, worker_index: int | None = None) -> int:
    """A 31-bit seed determined by (seed, round_index[, worker_index]) and nothing else."""
    entropy = [int(seed), int(round_index)] + ([] if worker_index is None else [int(worker_index)])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def visible_devices_for_task(addresses: Sequence[str], gpus_per_task: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for a task given the GPU addresses Spark assigned it (None: leave as is).

    No addresses and no GPUs requested is the CPU path: the environment is left untouched.
    """
    addresses = [str(a).strip() for a in addresses if str(a).strip()]
    if not addresses:
        if gpus_per_task > 0:
            raise RuntimeError(
                f"gpus_per_task={gpus_per_task} but Spark assigned this task no 'gpu' resource: set "
                "spark.task.resource.gpu.amount, spark.executor.resource.gpu.amount and "
                "spark.executor.resource.gpu.discoveryScript (train/gpu_discovery.sh)")
        return None
    return ",".join(addresses)


def pin_task_gpu(gpus_per_task: int) -> tuple[str | None, str | None]:
    """Point this Python worker at the GPU(s) of the current Spark task; returns (assigned, in use).

    Must run before TensorFlow is imported in this process. A reused Python worker whose TensorFlow
    is already bound to other GPUs cannot switch: it keeps its GPUs (Spark's address bookkeeping
    then differs from the device actually used). A fresh worker claims a GPU no live worker holds
    (common.cluster.claim_gpus), so the live workers of a node never share one.
    """
    global _PINNED_GPUS
    from pyspark import TaskContext

    ctx = TaskContext.get()
    resources = ctx.resources() if ctx is not None else {}
    info = resources.get("gpu")
    wanted = visible_devices_for_task(list(info.addresses) if info else [], gpus_per_task)
    if wanted is None:
        return None, os.environ.get("CUDA_VISIBLE_DEVICES")
    if "tensorflow" not in sys.modules:
        # Spark's address may be the GPU a surviving reused worker trains on (after a worker died).
        pinned = ",".join(claim_gpus(wanted.split(","), node_gpus()))
        os.environ["CUDA_VISIBLE_DEVICES"] = pinned
        _PINNED_GPUS = pinned
    elif _PINNED_GPUS != wanted:
        log.debug("Python worker %d keeps GPU(s) %s; Spark assigned %s",
                  os.getpid(), _PINNED_GPUS, wanted)
    return wanted, _PINNED_GPUS if _PINNED_GPUS is not None else os.environ.get("CUDA_VISIBLE_DEVICES")


def _spec(blob_key: str, blob: bytes) -> WorkerSpec:
    spec = _SPECS.get(blob_key)
    if spec is None:
        from pyspark import cloudpickle

        spec = cloudpickle.loads(blob)
        _SPECS[blob_key] = spec
        while len(_SPECS) > MAX_CACHED_MODELS * 2:
            _SPECS.popitem(last=False)
    return spec


def build_compiled(spec: WorkerSpec):
    """The model and its optimizer, compiled and with optimizer slots created (same on the driver)."""
    model = spec.model_factory()
    optimizer = spec.optimizer_factory()
    model.compile(optimizer=optimizer, **spec.compile_kwargs)
    # Slots (momentum, Adam moments) exist only after build; we ship and average them.
    model.optimizer.build(model.trainable_variables)
    return model


def _cached_model(key: str, spec: WorkerSpec) -> tuple[_CachedModel, bool]:
    cached = _MODELS.get(key)
    if cached is not None:
        _MODELS.move_to_end(key)
        return cached, False
    t0 = time.perf_counter()
    model = build_compiled(spec)
    _BUILD_COUNTS[key] += 1
    cached = _CachedModel(model, builds=_BUILD_COUNTS[key], build_s=time.perf_counter() - t0)
    _MODELS[key] = cached
    while len(_MODELS) > MAX_CACHED_MODELS:
        _MODELS.popitem(last=False)
    return cached, True


def set_learning_rate(optimizer, lr: float | None) -> None:
    """Set a constant learning rate for the round; a schedule optimizer derives it from iterations."""
    if lr is None:
        return
    from keras import optimizers

    inner = optimizer.inner_optimizer if hasattr(optimizer, "inner_optimizer") else optimizer
    rate = raw_learning_rate(inner)
    if isinstance(rate, optimizers.schedules.LearningRateSchedule) or callable(rate):
        raise ValueError("lr: the optimizer has a learning-rate schedule; pass lr=None and let "
                         "the schedule (driven by the shipped iterations) set it")
    inner.learning_rate = float(lr)


def load_state(model, weights: list, optimizer_state: list) -> None:
    if len(weights) != len(model.weights):
        raise ValueError(f"weights: got {len(weights)} arrays, the model has {len(model.weights)}")
    model.set_weights(restore_shapes(weights, [w.shape for w in model.weights], "weights"))
    variables = model.optimizer.variables
    if len(optimizer_state) != len(variables):
        raise ValueError(f"optimizer_state: got {len(optimizer_state)} arrays, the optimizer has "
                         f"{len(variables)} variables")
    for variable, value in zip(variables, restore_shapes(
            optimizer_state, [v.shape for v in variables], "optimizer_state")):
        variable.assign(value)


def restore_shapes(arrays: Sequence, shapes: Sequence, name: str) -> list:
    """Give decoded arrays their true shapes back.

    elephas 7.3's weights_to_bytes passes arrays through np.ascontiguousarray, which turns 0-d
    arrays (optimizer iterations, learning rate) into shape (1,); sizes must still agree.
    """
    out = []
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        shape = tuple(int(d) for d in shape)
        array = np.asarray(array)
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{name}[{i}]: expected shape {shape}, got {array.shape}")
        out.append(array.reshape(shape))
    return out


def _batch_size(batch) -> int:
    import keras

    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(keras.tree.flatten(x)[0].shape[0])


def make_worker_dataset(spec: WorkerSpec, shard_files: Sequence[str], worker_index: int, seed: int):
    """Call the dataset factory with the global seed set to `seed`.

    tf.data ops with an op seed still mix in the global seed, which a reused Python worker would
    otherwise carry over from its last task; fixing it makes the stream a function of `seed` alone
    (a single-process run reproduces it with `keras.utils.set_random_seed(seed)` first; here
    `seed_all`, the same seeds without dropping TensorFlow's caches).
    """
    seed_all(seed)
    # Keywords, so a functools.partial of train.data.make_dataset fits as it is.
    return spec.dataset_factory(shard_files=list(shard_files), worker_index=worker_index,
                                num_workers=spec.num_workers, seed=seed)


def _stream(spec: WorkerSpec, cfg: RoundConfig, worker_index: int,
            shard_files: Sequence[str]) -> tuple[tuple, _Stream, int, bool]:
    """The K-step data stream of this worker at `cfg.start_step`.

    Keyed by what determines the stream: the dataset factory, the worker's place and shards, and
    the seed; returns (key, stream, skipped steps, built now).
    """
    key = (cfg.data_key, worker_index, spec.num_workers, tuple(shard_files), cfg.seed)
    # Taken out of the cache while in use: a task that fails midway leaves no stale position.
    stream = _STREAMS.pop(key, None)
    if stream is not None and stream.position <= cfg.start_step:
        # Behind (another Python worker served the rounds in between): catch up by the gap,
        # which costs at most the rounds missed, not the whole run so far.
        gap = cfg.start_step - stream.position
        for _ in range(gap):
            next(stream.iterator)
        stream.position = cfg.start_step
        return key, stream, gap, False
    dataset = make_worker_dataset(spec, shard_files, worker_index, cfg.seed)
    # repeat(): a round may cross the end of the worker's shards; each pass reshuffles by seed.
    dataset = dataset.repeat()
    if cfg.start_step:
        dataset = dataset.skip(cfg.start_step)
    return key, _Stream(iter(dataset), cfg.start_step), cfg.start_step, True


def _remember_stream(key: tuple, stream: _Stream) -> None:
    _STREAMS[key] = stream
    while len(_STREAMS) > MAX_CACHED_STREAMS:
        _STREAMS.popitem(last=False)


def train_worker(spec: WorkerSpec, cfg: RoundConfig, state: list, worker_index: int,
                 shard_files: Sequence[str], task_start: float, gpu: tuple) -> Partial:
    """Train one worker's share of a round; returns its state and report as a reduction leaf."""
    die_after = armed_fault("train", worker_index)  # tests only (train.faults)
    phases = {}  # where a round's fixed cost goes, per worker (bench/train_throughput.py, part c)
    t0 = time.perf_counter()
    cached, built_now = _cached_model(cfg.model_key, spec)
    model = cached.model
    t1 = time.perf_counter()
    weights, optimizer_state = state[:cfg.n_weights], state[cfg.n_weights:]
    if cached.io is None:
        cached.io = StateIO(model)
    cached.io.load(weights, optimizer_state)
    set_learning_rate(model.optimizer, cfg.lr)
    t2 = time.perf_counter()
    phases["model_s"], phases["load_state_s"] = t1 - t0, t2 - t1

    skipped, stream_key, stream, pipeline_built = 0, None, None, True
    if cfg.steps is None:
        # One-pass rounds: the pipeline is determined by the round's own shuffle seed, so it is
        # built per round (the encoded-bytes cache under it is kept: train.data._encoded).
        iterator: Iterable = iter(make_worker_dataset(spec, shard_files, worker_index, cfg.seed))
    else:
        stream_key, stream, skipped, pipeline_built = _stream(spec, cfg, worker_index, shard_files)
        iterator = stream.iterator
    # Deterministic per (seed, round, worker): TF random ops during the steps (augmentation, ...).
    seed_all(round_seed(cfg.run_seed, cfg.round_index, worker_index))
    phases["data_s"] = time.perf_counter() - t2

    setup_s = time.perf_counter() - task_start
    records, steps, sums = 0, 0, {}
    t_train = time.perf_counter()
    while cfg.steps is None or steps < cfg.steps:
        if steps == die_after:
            kill_this_worker()
        t_batch = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        if steps == 0:
            phases["first_batch_s"] = time.perf_counter() - t_batch
        n = _batch_size(batch)
        # train_on_batch: the compiled train step and nothing else (no callbacks, no progbar).
        logs = model.train_on_batch(*batch, return_dict=True) if isinstance(batch, tuple) \
            else model.train_on_batch(batch, return_dict=True)
        for name, value in logs.items():
            sums[name] = sums.get(name, 0.0) + float(value) * n
        records += n
        steps += 1
    train_s = time.perf_counter() - t_train
    if stream is not None:
        stream.position += steps
        _remember_stream(stream_key, stream)

    t_out = time.perf_counter()
    arrays = cached.io.read()
    return leaf(records, arrays, {
        "worker_index": worker_index,
        "records": records,
        "steps": steps,
        "metrics": {k: v / records for k, v in sums.items()} if records else {},
        "pid": os.getpid(),
        "builds": cached.builds,
        "built_now": built_now,
        "build_s": cached.build_s if built_now else 0.0,
        "setup_s": setup_s,
        "train_s": train_s,
        "output_s": time.perf_counter() - t_out,
        "phases": phases,
        "skipped_steps": skipped,
        "pipeline_built": pipeline_built,
        "gpu_assigned": gpu[0],
        "gpu_visible": gpu[1],
    })


def run_task(spec_key: str, spec_broadcast, cfg: RoundConfig, state_broadcast,
             items: Iterable[tuple[int, list[str]]]) -> Iterator[tuple[int, Partial]]:
    """mapPartitions body: pin the GPU first, then import TensorFlow and train each item;
    yields (worker_index, leaf) for train.state_reduce."""
    task_start = time.perf_counter()
    gpu = pin_task_gpu(cfg.gpus_per_task)
    quiet_tensorflow()  # as on the driver: no native start-up lines from the executors
    # Only now may Keras/TensorFlow be imported (by the factories' modules and by elephas).
    from elephas.utils.serialization import bytes_to_weights

    spec = _spec(spec_key, spec_broadcast.value)
    state = bytes_to_weights(state_broadcast.value)
    for worker_index, shard_files in items:
        yield worker_index, train_worker(spec, cfg, state, worker_index, shard_files, task_start, gpu)
