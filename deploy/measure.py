"""A LiteRT flatbuffer measured: accuracy through the interpreter, one-thread images/s, file bytes.

Images come from the dataset's shards through train.data's readers, decoded once into NumPy
(float32 pixels in [0, 255], exactly what the model was trained on); the interpreter is resized to
a batch (the exports keep the batch dimension dynamic) and fed whole batches, the last one padded.
A full_int8 file with int8 input is fed pixels quantised with the input tensor's own scale and zero
point, and its int8 output is dequantised the same way before the top-k is taken.

Speed is one interpreter thread (`num_threads=1`, the figure a phone core or a shared CPU node
gives), timed per invoke with the calling thread's CPU clock: with one thread the interpreter
runs in the caller, so the clock counts the model's work and not the other processes of a busy
machine; wall-clock images/s are recorded beside it.
"""
from __future__ import annotations

import gzip
import logging
import time
import warnings
from typing import Any

import numpy as np

from lottery.points.inference import default_threads

log = logging.getLogger(__name__)

EVAL_BATCH = 256
SPEED_BATCH = 32


def load_images(info, split: str, input_size: int, *, limit: int | None = None,
                fmt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, s, s, 3] pixels, int labels) of `split` in file order, at most `limit`."""
    from train.data import make_dataset

    ds = make_dataset(info, split, batch_size=EVAL_BATCH, training=False, input_size=input_size,
                      fmt=fmt, cache=False)
    xs, ys, count = [], [], 0
    for x, y in ds.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
        count += len(y)
        if limit is not None and count >= limit:
            break
    if not xs:
        raise ValueError(f"{info.root}: split {split!r} has no records")
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


RUNTIMES = ("xnnpack", "builtin")


def interpreter(flatbuffer: bytes, threads: int | None = None, runtime: str = "xnnpack"):
    """TensorFlow's LiteRT interpreter: with its default XNNPACK delegate, or ("builtin") LiteRT's
    own kernels only."""
    import tensorflow as tf

    resolver = tf.lite.experimental.OpResolverType
    with warnings.catch_warnings():
        # TF 2.19 (pinned) announces the interpreter's move to the ai-edge-litert package.
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
        return tf.lite.Interpreter(
            model_content=flatbuffer, num_threads=threads or default_threads(),
            experimental_op_resolver_type=(resolver.AUTO if runtime == "xnnpack"
                                           else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES))


class LiteRTRunner:
    """One interpreter over a flatbuffer, resized to `batch` when its batch dimension is dynamic.

    XNNPACK (the default CPU delegate) refuses some files when their first batch runs: dynamic-range
    int8 weights in sparse storage, in TF 2.19. Those run on LiteRT's builtin kernels instead,
    which `runtime` records (slower: the figures say so)."""

    def __init__(self, flatbuffer: bytes, batch: int, threads: int | None = None):
        for runtime in RUNTIMES:
            self.runtime = runtime
            self.interpreter = interpreter(flatbuffer, threads, runtime)
            self.input = self.interpreter.get_input_details()[0]
            try:
                # Delegates prepare when tensors are allocated after a resize, or on the first run.
                if int(self.input["shape_signature"][0]) == -1:
                    self.interpreter.resize_tensor_input(self.input["index"],
                                                         [batch, *self.input["shape"][1:]])
                self.interpreter.allocate_tensors()
                self.input = self.interpreter.get_input_details()[0]
                self.output = self.interpreter.get_output_details()[0]
                self.batch = int(self.input["shape"][0])
                self.interpreter.invoke()
                break
            except RuntimeError as err:
                if runtime == RUNTIMES[-1] or "delegate" not in str(err).lower():
                    raise
                log.warning("XNNPACK refused the file (%s): LiteRT's builtin kernels instead",
                            str(err).splitlines()[0][:120])

    def _quantise(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return x.astype(np.float32, copy=False)
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def _dequantise(self, y: np.ndarray) -> np.ndarray:
        if self.output["dtype"] == np.float32:
            return y
        scale, zero = self.output["quantization"]
        return (y.astype(np.float32) - zero) * scale

    def set_batch(self, x: np.ndarray) -> int:
        """Feed up to `batch` images (padded with zeros); returns how many are real."""
        n = len(x)
        if n < self.batch:
            x = np.concatenate([x, np.zeros((self.batch - n,) + x.shape[1:], x.dtype)])
        self.interpreter.set_tensor(self.input["index"], self._quantise(x))
        return n

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), self.batch):
            n = self.set_batch(x[start:start + self.batch])
            self.interpreter.invoke()
            out.append(self._dequantise(self.interpreter.get_tensor(self.output["index"]))[:n])
        return np.concatenate(out)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (ties broken by index)."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else None
    if top is None:
        return 1.0
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def accuracies(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy (top-1), and top5_accuracy when there are at least 5 classes."""
    out = {"accuracy": float(np.mean(np.argmax(scores, axis=1) == labels))}
    if scores.shape[1] >= 5:
        out["top5_accuracy"] = topk_accuracy(scores, labels, 5)
    return out


def evaluate(flatbuffer: bytes, x: np.ndarray, y: np.ndarray, *, batch: int = EVAL_BATCH) -> dict[str, Any]:
    """Accuracy of the flatbuffer on (x, y) through the interpreter (every usable core)."""
    started = time.perf_counter()
    scores = LiteRTRunner(flatbuffer, batch).predict(x)
    return {**accuracies(scores, y), "eval_records": int(len(y)),
            "eval_s": round(time.perf_counter() - started, 3)}


def images_per_second(flatbuffer: bytes, x: np.ndarray, *, batch: int = SPEED_BATCH,
                      seconds: float = 2.0, threads: int = 1, warmup: int = 2) -> dict[str, float]:
    """One-thread throughput on real images: batch / median invoke time, by the calling thread's
    CPU clock (`images_per_s`) and by the wall clock (`images_per_s_wall`)."""
    runner = LiteRTRunner(flatbuffer, batch, threads)
    runner.set_batch(np.resize(x, (runner.batch,) + x.shape[1:]))
    for _ in range(max(1, warmup)):
        runner.interpreter.invoke()
    cpu, wall = [], []
    started = time.perf_counter()
    while not cpu or time.perf_counter() - started < seconds:
        c0, w0 = time.thread_time(), time.perf_counter()
        runner.interpreter.invoke()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    rate = lambda steps: runner.batch / max(float(np.median(steps)), 1e-9)  # noqa: E731
    return {"images_per_s": rate(cpu), "images_per_s_wall": rate(wall), "speed_batch": runner.batch,
            "threads": threads, "speed_invokes": len(cpu), "runtime": runner.runtime}


def sizes(flatbuffer: bytes) -> dict[str, int]:
    """File bytes and gzip bytes (level 9: what a download or an app bundle would hold)."""
    return {"bytes": len(flatbuffer), "gzip_bytes": len(gzip.compress(flatbuffer, compresslevel=9, mtime=0))}


def model_counts(model) -> dict[str, int]:
    """Parameters and non-zero parameters of a Keras model (every weight, frozen ones included)."""
    weights = model.get_weights()
    return {"params": int(sum(w.size for w in weights)),
            "nonzeros": int(sum(np.count_nonzero(w) for w in weights))}
