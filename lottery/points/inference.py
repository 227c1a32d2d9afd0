"""CPU inference throughput of a model as deployed: in Keras, or converted to LiteRT.

`inference_rate` times predict steps on random pixels. It takes a Keras model (its compiled
predict step; fold BatchNorm first with lottery.prune.compaction.fold_batchnorm for an inference
export) or a `LiteRTModel`: the model converted by Keras' own `export(format="litert")` to a
LiteRT (TensorFlow Lite) flatbuffer with a fixed batch, run by TensorFlow's interpreter with its
XNNPACK CPU kernels, which fold BatchNorm and fuse bias and activation into each convolution.
That is how a pruned network is usually deployed on CPUs, and there the measured speed-up of a
compacted network follows its multiply-add reduction far more closely than under Keras, whose
separate memory-bound passes (bias, activation, padding) shrink only linearly with the channels
(bench/compaction_speedup.py measures both).

Only models this process built are converted; a `.tflite` file is written for deployment, never
loaded from elsewhere.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from common.atomic import write_bytes

log = logging.getLogger(__name__)

STATS = ("mean", "median")
CLOCKS = ("wall", "cpu")


def input_shape(model, what: str) -> tuple[int, ...]:
    if len(model.inputs) != 1:
        raise ValueError(f"{what}: model {model.name!r} must have one input, has {len(model.inputs)}")
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(f"{what}: model {model.name!r} has an unknown input shape {shape}")
    return shape


def default_threads() -> int:
    """The cores this process may use (what TensorFlow's own thread pools size themselves to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LiteRTModel:
    """A Keras model converted to a LiteRT flatbuffer with a fixed batch size."""

    def __init__(self, model, batch_size: int):
        import keras

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = model.name
        self.batch_size = int(batch_size)
        self.input_shape = input_shape(model, "LiteRTModel")
        with tempfile.TemporaryDirectory(prefix="bt-litert-") as tmp:
            path = Path(tmp) / "model.tflite"
            spec = keras.InputSpec(shape=(self.batch_size,) + self.input_shape, dtype="float32")
            model.export(str(path), format="litert", verbose=False, input_signature=[spec])
            self.flatbuffer = path.read_bytes()

    def interpreter(self, threads: int | None = None):
        """A ready interpreter; `threads` None uses every core this process may use."""
        import tensorflow as tf

        with warnings.catch_warnings():
            # TF 2.19 (pinned) announces the interpreter's move to the ai-edge-litert package.
            warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
            interpreter = tf.lite.Interpreter(model_content=self.flatbuffer,
                                              num_threads=threads or default_threads())
        interpreter.allocate_tensors()
        return interpreter

    def predict(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Outputs for one batch of exactly `batch_size` inputs."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (self.batch_size,) + self.input_shape:
            raise ValueError(f"LiteRTModel {self.name!r}: input of shape {x.shape}, expected "
                             f"{(self.batch_size,) + self.input_shape}")
        interpreter = self.interpreter(threads)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    def save(self, path: str | os.PathLike) -> Path:
        write_bytes(path, self.flatbuffer)
        return Path(path)


def inference_rate(model, *, batch_size: int = 32, seconds: float = 2.0, warmup: int = 2,
                   seed: int = 0, stat: str = "mean", clock: str = "wall",
                   threads: int | None = None) -> float:
    """Measured CPU inference throughput (images/s) on random pixels.

    `model`: a Keras model (its compiled predict step) or a LiteRTModel (whose batch size must be
    `batch_size`; `threads` sets its interpreter's threads, default every usable core). Runs steps
    for `seconds` (wall time) after `warmup` untimed ones (tracing, XLA compiling when the model
    was compiled with jit_compile). stat "mean": images / total time; "median": batch_size / the
    median step time. clock "wall": elapsed time; "cpu": this process's CPU time (all threads),
    i.e. images per CPU-second: on a machine shared with other busy processes it measures the
    model's work rather than its share of the cores (use it with one thread: idle pool threads
    spinning would count as work).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    if batch_size < 1 or seconds <= 0:
        raise ValueError(f"batch_size must be >= 1 and seconds > 0, got {batch_size}, {seconds}")
    tick = time.perf_counter if clock == "wall" else time.process_time
    if isinstance(model, LiteRTModel):
        if model.batch_size != batch_size:
            raise ValueError(f"inference_rate: LiteRTModel {model.name!r} was converted for batch "
                             f"{model.batch_size}, not {batch_size}")
        shape = model.input_shape
        interpreter = model.interpreter(threads)
        x = np.random.default_rng(seed).uniform(0, 255, (batch_size,) + shape).astype(np.float32)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        step = interpreter.invoke
    else:
        import keras

        shape = input_shape(model, "inference_rate")
        x = np.random.default_rng(seed).uniform(0, 255, (batch_size,) + shape).astype(np.float32)
        x = keras.ops.convert_to_tensor(x)

        def step():
            model.predict_on_batch(x)
    for _ in range(max(warmup, 1)):   # trace / allocate outside the timing
        step()
    steps: list[float] = []
    started, ticked = time.perf_counter(), tick()
    while True:
        before = tick()
        step()
        steps.append(tick() - before)
        if time.perf_counter() - started >= seconds:
            break
    if stat == "median":
        per_step = float(np.median(steps))
    else:
        per_step = (tick() - ticked) / len(steps)
    return batch_size / max(per_step, 1e-9)
