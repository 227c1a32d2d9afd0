"""The `local` and `multiworker` engines: Keras fit under a tf.distribute strategy.

`local`: one process, `MirroredStrategy` over the visible GPUs when there are several; with one
GPU or none, the default strategy (same maths, none of the cross-device overhead).
`multiworker`: `MultiWorkerMirroredStrategy`, with `SlurmClusterResolver` under SLURM and TF_CONFIG
otherwise; every worker runs the same driver loop (collectives need all of them), only the chief
writes files.

Engines only train: the driver (`train.run`) owns epochs, the learning rate, evaluation,
history and checkpoints. An engine trains one epoch at a time and stops at the exact global steps
the driver asks for (rewind points) to let it save weights.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

from common.cluster import pin_local_gpu, process_place, tf_config_place
from train import adversarial
from train.data import DatasetInfo, make_dataset
from train.metrics import TOP5, compile_metrics, has_top5, top5_correct
from train.models import build_model
from train.settings import DenseSettings

log = logging.getLogger(__name__)


def bind_devices(engine: str | None) -> str | None:
    """Give this process the devices its role trains on; call before TensorFlow starts.

    `multiworker`: each worker keeps its share of its node's GPUs (`local_gpus`): one per worker
    when there are as many workers as GPUs, all of them for a worker alone on its node. SLURM's
    --gpus-per-task has already bound each task to its own GPU, which this keeps. Other engines
    bind nothing here (`local` mirrors over every visible GPU; an elephas task pins its own in
    train.spark_worker; the elephas driver hides them in configure_tensorflow). Returns the
    CUDA_VISIBLE_DEVICES set, or None.
    """
    if engine != "multiworker":
        return None
    place = tf_config_place() or process_place()
    device = pin_local_gpu(place, share=True)
    log.info("multiworker worker %d/%d, local %d/%d: GPU %s", place.rank, place.size,
             place.local_rank, place.local_size, device if device is not None else "none (CPU)")
    return device


def configure_tensorflow(settings: DenseSettings, *, trains: bool = True) -> None:
    """Process-wide TensorFlow/Keras set-up; call before any model or strategy is built.

    trains=False: this process only holds, averages and evaluates the model (the elephas
    driver): its TensorFlow sees no GPU, since TensorFlow maps nearly all the memory of every
    visible GPU and the driver shares its node with training tasks.
    """
    import tensorflow as tf

    if not trains:
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError as err:  # TensorFlow already started in this process
            if tf.config.get_visible_devices("GPU"):
                log.warning("this driver's TensorFlow keeps its GPUs (%s): training tasks on this "
                            "node have less GPU memory", err)
    if settings.deterministic:
        # Same seed -> same weights, which resumed runs and engine comparisons rely on.
        tf.config.experimental.enable_op_determinism()
    policy = _set_precision(settings.mixed_precision)
    if settings.mixed_precision and trains:
        log.info("mixed precision: %s", policy)


def device_types() -> list[str]:
    """The kinds of device this process's TensorFlow trains on ("CPU", "GPU")."""
    import tensorflow as tf

    return sorted({d.device_type for d in tf.config.get_visible_devices()})


def precision_policy(mixed: bool, devices: Sequence[str]) -> str:
    """The Keras dtype policy for training on `devices` (device types, or names such as
    "/physical_device:GPU:0"). mixed=True: float16 compute on GPUs (tensor cores; Keras adds loss
    scaling), bfloat16 on CPUs (float32's range, so no loss scaling; fast where the CPU has
    AVX512-BF16 or AMX). Variables stay float32 either way."""
    if not mixed:
        return "float32"
    if any("GPU" in str(d).upper() for d in devices):
        return "mixed_float16"
    return "mixed_bfloat16"


def _set_precision(mixed: bool, devices: Sequence[str] | None = None) -> str:
    """Set Keras' global policy for training on `devices` (default: this process's)."""
    import keras

    policy = precision_policy(mixed, device_types() if devices is None else devices)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def optimizer_builder(settings: DenseSettings, *, gmp: bool = False) -> Callable:
    """A zero-argument factory of the run's optimizer at the base learning rate (the driver sets
    the rate per epoch); captures plain values only, so cloudpickle ships it to Spark workers.
    gmp=True (the dense engines of a run with a GMP schedule): the growing-mask optimizer of
    train.masked_optimizer, holding one mask variable per pruned kernel."""
    kind, lr, momentum = settings.optimizer, settings.lr, settings.momentum
    wd = settings.weight_decay or None  # decoupled weight decay, applied by the optimizer
    gmp = gmp and settings.gmp_schedule != "none"
    exclude, depthwise = tuple(settings.gmp_exclude), settings.gmp_prune_depthwise

    def factory():
        import keras

        if kind == "sgd":
            optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=momentum, weight_decay=wd)
        else:
            optimizer = keras.optimizers.Adam(learning_rate=lr, weight_decay=wd)
        if gmp:
            from train.masked_optimizer import gmp_optimizer

            optimizer = gmp_optimizer(optimizer, exclude, depthwise)
        return optimizer

    return factory


def make_optimizer(settings: DenseSettings, *, gmp: bool = False):
    return optimizer_builder(settings, gmp=gmp)()


def applied_steps(model) -> int:
    """Optimizer updates applied so far: a step that loss scaling skips (non-finite gradients)
    does not count (Keras advances the inner optimizer's iterations only on applied steps)."""
    return int(getattr(model.optimizer, "inner_optimizer", model.optimizer).iterations.numpy())


def compile_kwargs(num_classes: int | None = None) -> dict:
    """loss/metrics every engine compiles with (models output softmax probabilities); top-5
    accuracy too when `num_classes` makes it meaningful (train.metrics)."""
    return {"loss": "sparse_categorical_crossentropy", "metrics": compile_metrics(num_classes)}


def set_learning_rate(model, lr: float) -> None:
    optimizer = model.optimizer
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer wraps the real one
    inner.learning_rate.assign(lr)


def model_builder(settings: DenseSettings, num_classes: int,
                  devices: Sequence[str] | None = None) -> Callable:
    """A zero-argument, picklable-by-cloudpickle factory of the run's uncompiled model, seeded
    so that every engine (and every Spark worker) starts from the same initial weights.

    `devices`: the device types the model trains on, which set its precision; default: those of
    the process that builds it. The elephas engine names its tasks' devices, so that its driver
    (which sees no GPU) builds the same variables as the tasks: under float16 Keras wraps the
    optimizer in a LossScaleOptimizer, which has more state than the bare optimizer.
    """
    name, options, size, seed = settings.model, dict(settings.model_options), settings.input_size, settings.seed
    mixed, bn_l1 = settings.mixed_precision, settings.bn_l1
    devices = None if devices is None else list(devices)
    attack = adversarial.config_from(settings)  # None: natural training

    def factory():
        import keras

        _set_precision(mixed, devices)  # also on Spark executors, which never ran configure_tensorflow
        keras.utils.set_random_seed(seed)
        # Adversarial training lives in the model's own train step, so every engine runs it.
        return adversarial.install(build_model(name, num_classes, size, bn_l1=bn_l1, **options),
                                   attack, seed)

    return factory


def _stop_at_steps(first_step: int, stops: Sequence[int], at_stop: Callable[[int], None]):
    """A Keras callback calling `at_stop(global_step)` after the batches that end at `stops`."""
    import keras

    wanted = set(stops)

    class StopAtSteps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = first_step + batch + 1
            if step in wanted:
                at_stop(step)

    return StopAtSteps()


def _count_steps(done: list):
    import keras

    class CountSteps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            done.append(batch)

    return CountSteps()


# Port slots per node for TensorFlow's SlurmClusterResolver (see _slurm_resolver): any number of
# tasks per node up to this gets an address.
_MAX_TASKS_PER_NODE = 1024


def _slurm_resolver():
    """SlurmClusterResolver that leaves GPU binding to SLURM (`--gpus-per-task`).

    TensorFlow's resolver divides the GPUs nvidia-smi shows among the node's tasks itself: with
    fewer visible GPUs than tasks (CPU nodes, or SLURM already binding one GPU per task) it fails
    with a zero range step, and otherwise it overrides SLURM's CUDA_VISIBLE_DEVICES. Here each
    task keeps what SLURM gave it and reports the GPUs it really sees.
    """
    import tensorflow as tf

    class TaskBoundSlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
        def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
            return {"GPU": len(tf.config.list_physical_devices("GPU"))}

    # gpus_per_task=1 only numbers the port slots; no device is assigned (auto_set_gpu=False).
    return TaskBoundSlurmResolver(gpus_per_node=_MAX_TASKS_PER_NODE, gpus_per_task=1,
                                  auto_set_gpu=False)


def _strategy(multiworker: bool):
    import tensorflow as tf

    if not multiworker:
        # MirroredStrategy over one device does the same maths as the default strategy but
        # costs ~40% of a small model's step time on CPU (bench/train_throughput.py, part b).
        if len(tf.config.list_logical_devices("GPU")) > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    if "SLURM_JOB_ID" in os.environ and "TF_CONFIG" not in os.environ:
        resolver = _slurm_resolver()
    else:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)


class LocalEngine:
    """Keras fit, one epoch per call, under MirroredStrategy or MultiWorkerMirroredStrategy."""

    def __init__(self, settings: DenseSettings, info: DatasetInfo, *, multiworker: bool = False):
        self.settings = settings
        self.info = info
        self.strategy = _strategy(multiworker)
        resolver = getattr(self.strategy, "cluster_resolver", None)
        spec = resolver.cluster_spec().as_dict() if multiworker and resolver is not None else {}
        if spec:
            # tf.distribute's convention: the "chief" task if there is one, else worker 0, is
            # the chief; both kinds train, chief first in the worker numbering.
            chiefs = len(spec.get("chief", []))
            self.num_workers = chiefs + len(spec.get("worker", []))
            self.is_chief = (resolver.task_type == "chief" if chiefs
                             else int(resolver.task_id) == 0)
            self.worker_index = 0 if resolver.task_type == "chief" else chiefs + int(resolver.task_id)
        else:
            self.worker_index, self.num_workers, self.is_chief = 0, 1, True
        # Every worker must run the same number of steps (collectives), so with several workers
        # an epoch is the smallest worker's full global batches, each giving `workers` steps'
        # worth of per-replica pieces (see _train_data).
        if self.num_workers > 1:
            n = self.num_workers
            self.steps_per_epoch = n * min(
                info.steps("train", settings.batch_size * n, w, n, drop_remainder=True,
                           fmt=settings.format) for w in range(n))
        else:
            self.steps_per_epoch = info.steps("train", settings.batch_size, fmt=settings.format)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size: {settings.batch_size} leaves no full training step "
                             f"per worker on {info.records['train']} records")
        with self.strategy.scope():
            self.model = model_builder(settings, info.num_classes)()
            self.model.compile(optimizer=make_optimizer(settings, gmp=True),
                               **compile_kwargs(info.num_classes))
            # Slots exist before any step, so the init checkpoint holds the optimizer at step 0.
            self.model.optimizer.build(self.model.trainable_variables)
        log.info("engine %s: %d replica(s), worker %d of %d, %d steps per epoch",
                 "multiworker" if multiworker else "local", self.strategy.num_replicas_in_sync,
                 self.worker_index, self.num_workers, self.steps_per_epoch)

    def _train_data(self, epoch: int):
        s = self.settings
        kwargs = dict(training=True, input_size=s.input_size, fmt=s.format, seed=s.seed,
                      epoch=epoch, cache=s.cache, augment=s.augment,
                      shuffle_buffer=s.shuffle_buffer)
        if self.num_workers == 1:
            return make_dataset(self.info, "train", batch_size=s.batch_size, **kwargs)
        # Each worker reads only its own share (auto-sharding is off in make_dataset). Keras
        # splits each batch of the global size (batch_size x workers) into per-replica pieces
        # of batch_size, and a worker's replica consumes one piece of its own data per step.
        return make_dataset(self.info, "train", batch_size=s.batch_size * self.num_workers,
                            worker_index=self.worker_index, num_workers=self.num_workers,
                            drop_remainder=True, **kwargs)

    def train_epoch(self, epoch: int, lr: float, stops: Sequence[int] = (),
                    at_stop: Callable[[int], None] | None = None) -> dict[str, float]:
        """Train epoch `epoch` at learning rate `lr`; call at_stop(step) after each global step
        in `stops`. Returns the epoch's training metrics (loss, accuracy, images_per_s)."""
        set_learning_rate(self.model, lr)
        done = []
        callbacks = [_count_steps(done)]
        if stops and at_stop is not None:
            callbacks.append(_stop_at_steps(epoch * self.steps_per_epoch, stops, at_stop))
        applied0 = applied_steps(self.model)
        t0 = time.perf_counter()
        if self.num_workers > 1:
            metrics = self._multiworker_epoch(self._train_data(epoch), callbacks)
        else:
            # The dataset's end is the epoch's end (exactly steps_per_epoch batches).
            history = self.model.fit(self._train_data(epoch), epochs=epoch + 1,
                                     initial_epoch=epoch, callbacks=callbacks, shuffle=False,
                                     verbose=0)
            metrics = {k: float(v[-1]) for k, v in history.history.items()}
        elapsed = time.perf_counter() - t0
        if len(done) != self.steps_per_epoch:  # the data ran out early: an epoch is wrong
            raise RuntimeError(f"epoch {epoch + 1}: trained {len(done)} steps, expected "
                               f"{self.steps_per_epoch}")
        images = (self.info.records["train"] if self.num_workers == 1
                  else self.steps_per_epoch * self.settings.batch_size * self.num_workers)
        metrics["images_per_s"] = images / elapsed if elapsed > 0 else 0.0
        # Steps loss scaling skipped (mixed_float16): the batch counted, no update was applied.
        metrics["skipped_steps"] = self.steps_per_epoch - (applied_steps(self.model) - applied0)
        return metrics

    def _multiworker_epoch(self, dataset, callbacks) -> dict[str, float]:
        """One epoch of a plain strategy.run loop: Keras 3's fit fails under
        MultiWorkerMirroredStrategy (keras-team/keras#20585, PerReplica conversion error)."""
        import keras
        import tensorflow as tf

        model, strategy = self.model, self.strategy
        global_batch = self.settings.batch_size * self.num_workers
        if getattr(self, "_step_fn", None) is None:
            def replica_step(x, y):
                x = adversarial.adversarial_inputs(model, x, y)  # x itself unless adversarial
                with tf.GradientTape() as tape:
                    probs = model(x, training=True)
                    per_example = keras.losses.sparse_categorical_crossentropy(y, probs)
                    loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                    if model.losses:  # regularizers (bn_l1), as Keras' fit adds them
                        loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
                grads = tape.gradient(loss, model.trainable_variables)
                model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
                correct = tf.reduce_sum(tf.cast(tf.equal(
                    tf.argmax(probs, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32)),
                    tf.float32))
                return loss, correct, top5_correct(probs, y)

            @tf.function
            def step(batch):
                loss, correct, top5 = strategy.run(replica_step, args=batch)
                return (strategy.reduce("SUM", loss, axis=None),
                        strategy.reduce("SUM", correct, axis=None),
                        strategy.reduce("SUM", top5, axis=None))

            self._step_fn = step
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        loss_sum = correct_sum = top5_sum = 0.0
        for cb in callbacks:
            cb.set_model(model)
        for batch_index in range(self.steps_per_epoch):
            loss, correct, top5 = self._step_fn(next(iterator))
            loss_sum += float(loss)
            correct_sum += float(correct)
            top5_sum += float(top5)
            for cb in callbacks:
                cb.on_train_batch_end(batch_index)
        metrics = {"loss": loss_sum / self.steps_per_epoch,
                   "accuracy": correct_sum / (self.steps_per_epoch * global_batch)}
        if has_top5(self.info.num_classes):
            metrics[TOP5] = top5_sum / (self.steps_per_epoch * global_batch)
        return metrics

    def evaluate(self) -> dict[str, float]:
        if self.num_workers > 1:
            return _evaluate_locally(self.model, self.settings, self.info)
        return evaluate_model(self.model, self.settings, self.info)

    def close(self) -> None:
        pass


def evaluate_model(model, settings: DenseSettings, info: DatasetInfo) -> dict[str, float]:
    """val_loss / val_accuracy over every validation record, exactly once."""
    data = make_dataset(info, "validation", batch_size=settings.batch_size, training=False,
                        input_size=settings.input_size, fmt=settings.format, cache=settings.cache)
    result = model.evaluate(data, verbose=0, return_dict=True)
    return {f"val_{k}": float(v) for k, v in result.items()}


def _evaluate_locally(model, settings: DenseSettings, info: DatasetInfo) -> dict[str, float]:
    """The same metrics without Keras' evaluate (which fails under MultiWorkerMirroredStrategy):
    every worker scores the whole validation split itself, so all report the same numbers."""
    import keras
    import tensorflow as tf

    data = make_dataset(info, "validation", batch_size=settings.batch_size, training=False,
                        input_size=settings.input_size, fmt=settings.format, cache=settings.cache)
    loss_sum = correct = top5 = count = 0.0
    for x, y in data:
        probs = model(x, training=False)
        loss_sum += float(tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, probs)))
        correct += float(tf.reduce_sum(tf.cast(tf.equal(
            tf.argmax(probs, axis=-1, output_type=tf.int32), y), tf.float32)))
        top5 += float(top5_correct(probs, y))
        count += int(y.shape[0])
    metrics = {"val_loss": loss_sum / count, "val_accuracy": correct / count}
    if has_top5(info.num_classes):
        metrics[f"val_{TOP5}"] = top5 / count
    return metrics
