"""Quantise one target into `<target>/quantized/`, resumably: one variant at a time, recorded as done.

For each requested variant: convert (deploy.litert; builtin ops only), write `<variant>.tflite`
atomically, evaluate it through the interpreter on the validation shards, time it on one thread,
then rewrite `results.json` atomically with the variant's entry. A variant is done when
results.json holds its entry, made with the same options, for the same weights (the sha256 of the
source file) and its .tflite file has the recorded size: a re-run skips it, so re-running a
finished command does nothing and re-running a killed one finishes the missing variants. Changed
weights (a retrained point) start the target afresh.

results.json: `schema_version` (1), `kind` ("quantized"), `target` (what was quantised),
`source` ({file, sha256}), `model` ({name, params, nonzeros, sparsity, input_size, num_classes,
mixed_precision_rebuilt}), `dataset` ({root, manifest_sha256, validation_records}), `keras`
({accuracy[, top5_accuracy]}: the Keras model on the same images), `variants`
({variant: {file, bytes, gzip_bytes, bytes_ratio, gzip_ratio (both vs float32 when present),
accuracy[, top5_accuracy], accuracy_drop (vs the Keras model), images_per_s (one thread, CPU
clock), images_per_s_wall, speed_batch, threads, operators (sorted builtin names), builtin_only,
options, convert_s, eval_records, eval_s}}).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable

import numpy as np

from common.atomic import read_json, write_bytes, write_json
from deploy import litert, measure
from deploy.targets import Target

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KIND = "quantized"


@dataclasses.dataclass(frozen=True)
class Options:
    variants: tuple[str, ...] = litert.VARIANTS
    int8_io: bool = False            # full_int8: int8 input and output
    representative: int = 200        # train images calibrating full_int8
    max_records: int | None = None   # validation images evaluated (None: every one)
    seconds: float = 2.0             # timing window per variant
    speed_batch: int = measure.SPEED_BATCH
    data: str | None = None          # dataset location override

    def __post_init__(self):
        for name in self.variants:
            litert.parse_variant(name)   # ValueError naming --variants
        if not self.variants:
            raise ValueError("--variants: give at least one variant")
        if self.representative < 1:
            raise ValueError(f"--representative: must be >= 1, got {self.representative}")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"--max-records: must be >= 1, got {self.max_records}")
        if self.seconds <= 0:
            raise ValueError(f"--seconds: must be > 0, got {self.seconds}")
        if self.speed_batch < 1:
            raise ValueError(f"--speed-batch: must be >= 1, got {self.speed_batch}")

    def for_variant(self, variant: str) -> dict[str, Any]:
        """The options that change a variant's file or figures (its identity in results.json)."""
        out: dict[str, Any] = {"max_records": self.max_records, "speed_batch": self.speed_batch}
        if litert.parse_variant(variant)[0] == "full_int8":
            out.update(int8_io=self.int8_io, representative=self.representative)
        return out


def read_results(target: Target) -> dict[str, Any] | None:
    path = target.paths.results
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or record.get("kind") != KIND:
        raise ValueError(f"{path}: not a results file of `bigticket quantize`")
    return record


def _done(record: dict | None, variant: str, options: Options, target: Target) -> bool:
    entry = ((record or {}).get("variants") or {}).get(variant)
    if not entry or entry.get("options") != options.for_variant(variant):
        return False
    file = target.paths.model(variant)
    return file.is_file() and file.stat().st_size == entry.get("bytes")


class _Lazy:
    """The model, images and representative set of a target, built on first use only."""

    def __init__(self, target: Target, options: Options):
        self.target, self.options = target, options
        self._model = self._data = self._rep = self._info = None
        self.rebuilt = False

    @property
    def model(self):
        if self._model is None:
            loaded = self.target.load()
            self._model = litert.as_float32(loaded)
            self.rebuilt = self._model is not loaded
        return self._model

    def info(self):
        if self._info is None:
            self._info = self.target.dataset(self.options.data)
        return self._info

    @property
    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        if self._data is None:
            info, size, fmt = self.info()
            self._data = measure.load_images(info, "validation", size, limit=self.options.max_records,
                                             fmt=fmt)
        return self._data

    def representative(self) -> Iterable[np.ndarray]:
        if self._rep is None:
            info, size, fmt = self.info()
            self._rep = measure.load_images(info, "train", size, limit=self.options.representative,
                                            fmt=fmt)[0]
        return [self._rep]


def _header(target: Target, lazy: _Lazy, digest: str) -> dict[str, Any]:
    model = lazy.model
    info, size, _fmt = lazy.info()
    counts = measure.model_counts(model)
    x, y = lazy.validation
    keras_scores = np.concatenate([model.predict_on_batch(x[i:i + measure.EVAL_BATCH])
                                   for i in range(0, len(x), measure.EVAL_BATCH)])
    return {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "target": target.describe,
        "source": {"file": str(target.source), "sha256": digest},
        "model": {"name": model.name, **counts,
                  "sparsity": 1.0 - counts["nonzeros"] / counts["params"] if counts["params"] else 0.0,
                  "input_size": size, "num_classes": int(model.outputs[0].shape[-1]),
                  "mixed_precision_rebuilt": lazy.rebuilt},
        "dataset": {"root": str(info.root), "manifest_sha256": info.manifest_sha256,
                    "validation_records": int(len(y))},
        "keras": measure.accuracies(np.asarray(keras_scores, dtype=np.float32), y),
        "variants": {},
    }


def _ratios(record: dict[str, Any]) -> None:
    base = record["variants"].get("float32")
    keras_acc = record["keras"]["accuracy"]
    for entry in record["variants"].values():
        entry["accuracy_drop"] = keras_acc - entry["accuracy"]
        if base:
            entry["bytes_ratio"] = entry["bytes"] / base["bytes"]
            entry["gzip_ratio"] = entry["gzip_bytes"] / base["gzip_bytes"]


def quantize_target(target: Target, options: Options = Options()) -> dict[str, Any]:
    """Export and measure every requested variant of `target` not done yet; returns results.json."""
    digest = target.source_digest()
    record = read_results(target)
    if record is not None and (record.get("source") or {}).get("sha256") != digest:
        log.info("%s %s: weights changed since the last export: starting afresh", target.kind, target.name)
        record = None
    todo = [v for v in options.variants if not _done(record, v, options, target)]
    if not todo:
        log.info("%s %s: every variant already quantised (%s)", target.kind, target.name,
                 target.paths.results)
        return record
    lazy = _Lazy(target, options)
    if record is None:
        record = _header(target, lazy, digest)
    for variant in todo:
        started = time.perf_counter()
        _base, _sparse = litert.parse_variant(variant)
        flatbuffer = litert.convert(lazy.model, variant, representative=lazy.representative,
                                    int8_io=options.int8_io)
        convert_s = time.perf_counter() - started
        operators = litert.check_builtin_only(flatbuffer, f"{target.kind} {target.name} {variant}")
        file = target.paths.model(variant)
        write_bytes(file, flatbuffer)
        x, y = lazy.validation
        entry = {"file": file.name, **measure.sizes(flatbuffer), **measure.evaluate(flatbuffer, x, y),
                 **measure.images_per_second(flatbuffer, x, batch=options.speed_batch,
                                             seconds=options.seconds),
                 "operators": sorted(set(operators)), "builtin_only": True,
                 "options": options.for_variant(variant), "convert_s": round(convert_s, 3)}
        record["variants"][variant] = entry
        _ratios(record)
        write_json(target.paths.results, record)   # after each variant: a kill loses one at most
        log.info("%s %s: %s %d bytes (gzip %d), accuracy %.4f, %.0f images/s on one thread",
                 target.kind, target.name, variant, entry["bytes"], entry["gzip_bytes"],
                 entry["accuracy"], entry["images_per_s"])
    return record
