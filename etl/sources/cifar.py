"""cifar10 / cifar100: the binary distribution and the python batches, archived or extracted.

`--input` is the downloaded `.tar.gz` or its extracted folder (or the folder holding it). Train is
the data batches (CIFAR-100: `train`), validation the test batch. One unit per batch file; a
record is one row of the batch and its payload the 32x32x3 uint8 pixels. Python batches and
their meta files go through etl.sources.safe_pickle: only NumPy arrays and plain containers.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import re
import tarfile
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from etl.records import ClassInfo, InputRecord, Rejected
from etl.sources.base import Payload, Source
from etl.sources.safe_pickle import safe_loads

log = logging.getLogger(__name__)

PIXELS = 32 * 32 * 3
MAX_FILE_BYTES = 1024 * 1024 * 1024  # the CIFAR-100 train batch is ~150 MB


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    classes: int
    folders: dict            # format -> extracted folder name
    train: dict              # format -> regex of train batch names
    test: dict               # format -> validation batch name
    meta: dict               # format -> class-name file
    label_byte: int          # binary: offset of the label used (CIFAR-100: fine, after coarse)
    label_key: str           # python: batch key holding the labels
    names_key: str           # python: meta key holding the class names

    @property
    def record_bytes(self) -> int:
        return self.label_byte + 1 + PIXELS


VARIANTS = {
    "cifar10": Variant("cifar10", 10,
                       {"bin": "cifar-10-batches-bin", "py": "cifar-10-batches-py"},
                       {"bin": r"data_batch_(\d+)\.bin", "py": r"data_batch_(\d+)"},
                       {"bin": "test_batch.bin", "py": "test_batch"},
                       {"bin": "batches.meta.txt", "py": "batches.meta"},
                       0, "labels", "label_names"),
    "cifar100": Variant("cifar100", 100,
                        {"bin": "cifar-100-binary", "py": "cifar-100-python"},
                        {"bin": r"(train)\.bin", "py": r"(train)"},
                        {"bin": "test.bin", "py": "test"},
                        {"bin": "fine_label_names.txt", "py": "meta"},
                        1, "fine_labels", "fine_label_names"),
}


@dataclasses.dataclass(frozen=True)
class BatchUnit:
    split: str
    name: str  # batch file name, e.g. data_batch_1


@dataclasses.dataclass(frozen=True)
class Batch:
    pixels: np.ndarray   # (n, 3072) uint8, channel-major rows as distributed
    labels: np.ndarray   # (n,) int
    tail: int            # binary: bytes after the last whole record


class CifarSource(Source):
    def __init__(self, variant: str, input_path: str):
        self.variant = VARIANTS[variant]
        self.name = variant
        self.input = Path(input_path).resolve()
        self.archive: Optional[Path] = None
        self.folder: Optional[str] = None  # dir path, or member prefix inside the archive
        names = self._locate()
        fmts = [f for f in ("bin", "py") if self._batch_names(names, f)]
        if len(fmts) != 1:
            what = "both binary and python batches" if fmts else "no CIFAR batches"
            raise ValueError(f"--input: {input_path}: {what} for {variant} "
                             f"(expected {self.variant.folders['bin']}/ or "
                             f"{self.variant.folders['py']}/ contents)")
        self.fmt = fmts[0]
        self.train_batches = self._batch_names(names, self.fmt)
        for required in (self.variant.test[self.fmt], self.variant.meta[self.fmt]):
            if required not in names:
                raise ValueError(f"--input: {input_path}: {required} is missing")
        self._classes = self._read_classes()

    # -- finding the files -----------------------------------------------------------------
    def _locate(self) -> set[str]:
        """Set self.archive/self.folder; return the base names of the candidate files."""
        folders = set(self.variant.folders.values())
        if self.input.is_file():
            self.archive = self.input
            try:
                with tarfile.open(self.input, "r:*") as tf:
                    members = tf.getmembers()
            except (tarfile.TarError, EOFError, OSError) as err:
                raise ValueError(f"--input: {self.input}: not a readable tar archive ({err})") \
                    from None
            self._members = {}
            for m in members:
                parts = m.name.split("/")
                # Only regular files directly in the archive root or in the known folder; every
                # other member (links included) is never opened.
                if m.isreg() and (len(parts) == 1 or (len(parts) == 2 and parts[0] in folders)):
                    self._members.setdefault(parts[-1], m.name)
            return set(self._members)
        if not self.input.is_dir():
            raise ValueError(f"--input: {self.input}: no such file or directory")
        for candidate in [self.input] + [self.input / f for f in sorted(folders)]:
            if candidate.is_dir():
                names = {p.name for p in candidate.iterdir() if p.is_file()}
                if any(self._batch_names(names, f) for f in ("bin", "py")):
                    self.folder = str(candidate)
                    return names
        return set()

    def _batch_names(self, names, fmt: str) -> list[str]:
        pattern = re.compile(self.variant.train[fmt] + r"$")
        found = [(pattern.match(n), n) for n in names]
        return [n for m, n in sorted(((m, n) for m, n in found if m),
                                     key=lambda mn: (len(mn[0].group(1)), mn[0].group(1)))]

    def _origin(self, name: str) -> str:
        if self.archive:
            return f"{self.archive}!{self._members[name]}"
        return str(Path(self.folder) / name)

    def _read_bytes(self, name: str) -> bytes:
        if self.archive:
            with tarfile.open(self.archive, "r:*") as tf:
                member = tf.getmember(self._members[name])
                if member.size > MAX_FILE_BYTES:
                    raise ValueError(f"{self._origin(name)}: larger than {MAX_FILE_BYTES} bytes")
                return tf.extractfile(member).read()  # into memory, never onto disk
        path = Path(self.folder) / name
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        return path.read_bytes()

    def _read_classes(self) -> list[ClassInfo]:
        meta = self.variant.meta[self.fmt]
        origin = self._origin(meta)
        data = self._read_bytes(meta)
        if self.fmt == "bin":
            names = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
            names = [n for n in names if n]
        else:
            obj = safe_loads(data, origin)
            raw = _str_keys(obj, origin).get(self.variant.names_key)
            if not isinstance(raw, list):
                raise ValueError(f"{origin}: no {self.variant.names_key!r} list")
            names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]
        if len(names) != self.variant.classes or len(set(names)) != len(names):
            raise ValueError(f"{origin}: expected {self.variant.classes} distinct class names, "
                             f"found {len(names)}")
        return [ClassInfo(i, n, n) for i, n in enumerate(names)]

    # -- driver side -----------------------------------------------------------------------
    def classes(self) -> list[ClassInfo]:
        return list(self._classes)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "input": str(self.input),
                "format": {"bin": "binary", "py": "python"}[self.fmt],
                "train_batches": list(self.train_batches),
                "validation_batch": self.variant.test[self.fmt]}

    def units(self) -> list[Any]:
        return ([BatchUnit("train", n) for n in self.train_batches]
                + [BatchUnit("validation", self.variant.test[self.fmt])])

    # -- executor side ---------------------------------------------------------------------
    def _batch(self, name: str) -> Batch:
        return _CACHE.get((str(self.input), self.fmt, name), lambda: self._parse(name))

    def _parse(self, name: str) -> Batch:
        origin = self._origin(name)
        data = self._read_bytes(name)
        if self.fmt == "bin":
            size = self.variant.record_bytes
            n = len(data) // size
            rows = np.frombuffer(data, np.uint8, n * size).reshape(n, size)
            return Batch(rows[:, self.variant.label_byte + 1:], rows[:, self.variant.label_byte]
                         .astype(np.int64), len(data) - n * size)
        batch = _str_keys(safe_loads(data, origin), origin)
        pixels, labels = batch.get("data"), batch.get(self.variant.label_key)
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 \
                or pixels.shape[1] != PIXELS:
            raise ValueError(f"{origin}: 'data' is not an (n, {PIXELS}) uint8 array")
        labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
        if labels.shape != (pixels.shape[0],):
            raise ValueError(f"{origin}: {self.variant.label_key!r} does not hold one label "
                             "per row")
        return Batch(pixels, labels, 0)

    def records(self, unit: Any) -> Iterator[InputRecord]:
        batch = self._batch(unit.name)
        origin = self._origin(unit.name)
        for i, label in enumerate(batch.labels.tolist()):
            reject = None
            if not 0 <= label < self.variant.classes:
                reject = ("no_label", f"label {label} outside 0..{self.variant.classes - 1}")
            yield InputRecord(key=f"{unit.split}/{unit.name}/{i:05d}", split=unit.split,
                              label=label if reject is None else -1, source=f"{origin}[{i}]",
                              locator=(unit.name, i), reject=reject)
        if batch.tail:
            n = len(batch.labels)
            yield InputRecord(key=f"{unit.split}/{unit.name}/{n:05d}", split=unit.split,
                              label=-1, source=f"{origin}[{n}]", locator=None,
                              reject=("truncated", f"{batch.tail} trailing bytes, short of a "
                                      f"{self.variant.record_bytes}-byte record"))

    def load(self, record: InputRecord) -> Payload:
        if record.locator is None:
            raise Rejected("error", "no pixels for this record")
        name, i = record.locator
        row = self._batch(name).pixels[i]
        # Rows hold the 1024 red, then green, then blue values of a 32x32 image.
        return np.ascontiguousarray(row.reshape(3, 32, 32).transpose(1, 2, 0))


def _str_keys(obj: Any, origin: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{origin}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class _BatchCache:
    """Parsed batches per process, least recently used dropped first.

    A shard task reads its records in seeded order, which visits every batch of the split in turn;
    holding all of a split's batches (CIFAR has at most 5 train batches of 30 MB) avoids re-parsing.
    """

    def __init__(self, capacity: int = 6):
        self._lock = threading.Lock()
        self._capacity = capacity
        self._items: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()

    def get(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            while len(self._items) >= self._capacity:
                self._items.popitem(last=False)  # free before parsing the next one
            value = self._items[key] = make()
            return value


_CACHE = _BatchCache()
