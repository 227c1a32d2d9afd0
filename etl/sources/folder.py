"""imagenet-folder: `ROOT/train/<synset>/*` and `ROOT/{validation,val}/` (synset folders or flat).

One unit per synset folder, one for the entries directly under each split folder that are not
synset folders, and chunks of at most FLAT_CHUNK names for a flat validation folder, so listing
the tree is spread over the tasks. Every directory entry becomes one record; names that do not
fit the layout (hidden files, other extensions, nested folders) are rejected records, so they are
counted in the quarantine rather than silently skipped.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import stat
from pathlib import Path
from typing import Any, Iterator, Optional

from etl.records import ClassInfo, InputRecord, Rejected
from etl.sources import imagenet_layout as layout
from etl.sources.base import Payload, Source

log = logging.getLogger(__name__)

FLAT_CHUNK = 1000
VALIDATION_DIRS = ("validation", "val")


@dataclasses.dataclass(frozen=True)
class SynsetDirUnit:
    split: str
    split_dir: str  # folder name under ROOT: train, validation or val
    synset: str


@dataclasses.dataclass(frozen=True)
class LooseUnit:
    """Entries under a split folder that are not synset folders (when flat: the folders)."""

    split: str
    split_dir: str
    names: tuple[str, ...]
    why: str


@dataclasses.dataclass(frozen=True)
class FlatChunkUnit:
    split: str
    split_dir: str
    names: tuple[str, ...]


def _entry_problem(path: Path) -> Optional[tuple[str, str]]:
    """Why a directory entry is not a readable regular image file (symlinks are followed)."""
    try:
        st = os.stat(path)
    except OSError as err:
        return "error", f"cannot stat ({err.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "unexpected_name", "a directory where an image file was expected"
    if not stat.S_ISREG(st.st_mode):
        return "unexpected_name", "not a regular file"
    return None


def read_file_capped(path: Path, max_bytes: int) -> bytes:
    """The file's bytes; Rejected('too_large') past max_bytes without reading the rest."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise Rejected("too_large", f"{size} bytes > max_image_bytes {max_bytes}")
            # size + 1: a file that grew since stat is still caught; reading max_bytes + 1 would
            # allocate the whole cap (32 MiB) for every image.
            data = fh.read(size + 1)
            if len(data) > size:
                data += fh.read(max_bytes + 1 - len(data))
    except OSError as err:
        raise Rejected("error", f"cannot read: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise Rejected("too_large", f"more than max_image_bytes {max_bytes}")
    return data


class FolderSource(Source):
    name = "imagenet-folder"

    def __init__(self, root: str, synsets_file: Optional[str] = None,
                 synset_words_file: Optional[str] = None,
                 val_ground_truth_file: Optional[str] = None,
                 max_image_bytes: int = 32 * 1024 * 1024, kind: str = "imagenet-folder"):
        self.root = Path(root).resolve()
        self.name = kind
        self.max_image_bytes = max_image_bytes
        self.synsets_file = synsets_file
        self.synset_words_file = synset_words_file
        self.val_ground_truth_file = val_ground_truth_file
        if not self.root.is_dir():
            raise ValueError(f"--input: {root}: not a directory")
        train = self.root / "train"
        if not train.is_dir():
            raise ValueError(f"--input: {train}: no train folder (expected ROOT/train/<synset>/)")
        train_dirs = self._synset_dirs("train")
        if synsets_file:
            synsets = layout.read_synsets(synsets_file)
            missing = [s for s in synsets if s not in train_dirs]
            if missing:
                raise ValueError(f"synsets_file: {synsets_file}: {len(missing)} synset(s) have no "
                                 f"folder under {train}, e.g. {missing[0]!r}")
        else:
            synsets = sorted(train_dirs)
            if not synsets:
                raise ValueError(f"--input: {train}: no synset folders")
        self._classes = layout.make_classes(synsets, synset_words_file)
        self._label = {c.synset: c.index for c in self._classes}
        present = [d for d in VALIDATION_DIRS if (self.root / d).is_dir()]
        if len(present) > 1:
            raise ValueError(f"--input: {self.root}: both validation/ and val/ exist; keep one")
        self.val_dir = present[0] if present else None
        self.flat_val = None
        if self.val_dir and val_ground_truth_file:
            self.flat_val = layout.FlatVal.build(val_ground_truth_file, synsets)
        elif self.val_dir:
            with os.scandir(self.root / self.val_dir) as it:
                kinds = {e.is_dir() for e in it}
            if kinds == {False}:
                raise ValueError(f"val_ground_truth_file: required, {self.root / self.val_dir} "
                                 "holds files and no synset folders (a flat validation layout)")
        elif val_ground_truth_file:
            raise ValueError(f"val_ground_truth_file: given but {self.root} has no validation/ "
                             "or val/ folder")

    # -- driver side -----------------------------------------------------------------------
    def _synset_dirs(self, split_dir: str) -> list[str]:
        with os.scandir(self.root / split_dir) as it:
            return sorted(e.name for e in it if e.is_dir() and layout.valid_synset(e.name))

    def classes(self) -> list[ClassInfo]:
        return list(self._classes)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "input": str(self.root), "synsets_file": self.synsets_file,
                "synset_words_file": self.synset_words_file,
                "val_ground_truth_file": self.val_ground_truth_file,
                "validation_layout": ("flat" if self.flat_val else
                                      "folders" if self.val_dir else "none")}

    def units(self) -> list[Any]:
        units: list[Any] = []
        splits = [("train", "train")] + ([("validation", self.val_dir)] if self.val_dir else [])
        for split, split_dir in splits:
            with os.scandir(self.root / split_dir) as it:
                entries = sorted((e.name, e.is_dir()) for e in it)
            if split == "validation" and self.flat_val:
                files = [n for n, is_dir in entries if not is_dir]
                units += [FlatChunkUnit(split, split_dir, tuple(files[i:i + FLAT_CHUNK]))
                          for i in range(0, len(files), FLAT_CHUNK)]
                odd = tuple(n for n, is_dir in entries if is_dir)
                if odd:
                    units.append(LooseUnit(split, split_dir, odd, "a folder inside the flat "
                                           "validation folder"))
                continue
            dirs = [n for n, is_dir in entries if is_dir and layout.valid_synset(n)]
            units += [SynsetDirUnit(split, split_dir, d) for d in dirs]
            odd = tuple(n for n, is_dir in entries if not (is_dir and layout.valid_synset(n)))
            if odd:
                units.append(LooseUnit(split, split_dir, odd,
                                       "not a synset folder (images belong in "
                                       "ROOT/<split>/<synset>/)"))
        log.info("%s: %d units under %s", self.name, len(units), self.root)
        return units

    # -- executor side ---------------------------------------------------------------------
    def _record(self, split: str, synset: str, label: int, rel: str,
                reject: Optional[tuple[str, str]]) -> InputRecord:
        basename = rel.rsplit("/", 1)[-1]
        return InputRecord(key=layout.image_key(split, synset, basename), split=split,
                           label=label if reject is None else -1,
                           source=str(self.root / rel), locator=rel, reject=reject)

    def records(self, unit: Any) -> Iterator[InputRecord]:
        if isinstance(unit, LooseUnit):
            for name in unit.names:
                yield InputRecord(key=f"{unit.split}/_unexpected/{name}", split=unit.split,
                                  label=-1, source=str(self.root / unit.split_dir / name),
                                  locator=None, reject=("unexpected_name", unit.why))
        elif isinstance(unit, FlatChunkUnit):
            for name in unit.names:
                rel = f"{unit.split_dir}/{name}"
                synset, label, reject = self.flat_val.classify(name)
                if reject is None:
                    reject = self._entry_reject(rel, name)
                yield self._record(unit.split, synset, label, rel, reject)
        elif isinstance(unit, SynsetDirUnit):
            label = self._label.get(unit.synset)
            folder = self.root / unit.split_dir / unit.synset
            try:
                with os.scandir(folder) as it:
                    names = sorted(e.name for e in it)
            except OSError as err:
                raise ValueError(f"{folder}: cannot list ({err.strerror})") from None
            for name in names:
                rel = f"{unit.split_dir}/{unit.synset}/{name}"
                reject = self._entry_reject(rel, name)
                if reject is None and label is None:
                    reject = ("no_label", f"synset folder {unit.synset!r} is not in the class list")
                yield self._record(unit.split, unit.synset, -1 if label is None else label, rel,
                                   reject)
        else:
            raise TypeError(f"{self.name}: unknown unit {unit!r}")

    def _entry_reject(self, rel: str, name: str) -> Optional[tuple[str, str]]:
        problem = layout.name_problem(name)
        if problem:
            return "unexpected_name", problem
        return _entry_problem(self.root / rel)

    def load(self, record: InputRecord) -> Payload:
        return read_file_capped(self.root / record.locator, self.max_image_bytes)
