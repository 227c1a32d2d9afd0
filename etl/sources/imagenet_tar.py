"""imagenet-tar: the official ILSVRC2012 tars, read in place (never extracted, never copied).

`--input` is a directory holding `ILSVRC2012_img_train.tar` (one inner tar per synset) and/or
`ILSVRC2012_img_val.tar` (flat, labelled by the ground-truth file), or the path of one such tar
(a tar whose members are all `.tar` files is a train tar, any other a validation tar).

The driver reads only the outer tar's headers. A unit is one inner tar (its data offset and size
in the outer file) or a chunk of validation members; a task opens the outer file, reads the inner
tar's headers through a window bounded to that member, and later seeks straight to each image.
Only regular members with plain expected names are read: links, devices, folders, sparse files,
absolute paths and '..' become `unsafe_member` records; members over max_image_bytes become
`too_large` records without being read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Optional

from tqdm import tqdm

from etl.records import ClassInfo, InputRecord, Rejected
from etl.sources import imagenet_layout as layout
from etl.sources.base import Loader, Source

log = logging.getLogger(__name__)

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
VAL_CHUNK = 1000
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError)


class Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start+size) of an open file.

    tarfile reads an inner archive through it, so a damaged inner tar can never make the reader
    run on into the neighbouring members of the outer archive.
    """

    def __init__(self, fh, start: int, size: int):
        super().__init__()
        self._fh, self._start, self._size, self._pos = fh, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._size - self._pos))
        if n == 0:
            return 0
        self._fh.seek(self._start + self._pos)
        data = self._fh.read(n)
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def member_problem(member: tarfile.TarInfo) -> Optional[tuple[str, str]]:
    """(reason, detail) when a member must not be read, else None."""
    name = member.name
    if member.issym() or member.islnk():
        return "unsafe_member", f"link to {member.linkname!r}"
    if member.isdir():
        return "unsafe_member", "directory"
    if member.isdev() or member.isfifo():
        return "unsafe_member", "device or fifo"
    if member.issparse():
        return "unsafe_member", "sparse file"
    if not member.isreg():
        return "unsafe_member", f"member type {member.type!r}"
    if name.startswith("/") or "\\" in name or ".." in PurePosixPath(name).parts:
        return "unsafe_member", "absolute path or '..' component"
    if "/" in plain_name(name):
        return "unexpected_name", "nested path; expected a plain file name"
    return None


def plain_name(name: str) -> str:
    """Member name without the './' prefix that `tar -C dir .` adds."""
    while name.startswith("./"):
        name = name[2:]
    return name


@dataclasses.dataclass(frozen=True)
class InnerTarUnit:
    tar: str       # outer tar path
    member: str    # e.g. n01440764.tar
    synset: str
    offset: int    # data offset of the inner tar in the outer file
    size: int


@dataclasses.dataclass(frozen=True)
class ValChunkUnit:
    tar: str
    entries: tuple[tuple[str, int, int], ...]  # (member name, data offset, size)


@dataclasses.dataclass(frozen=True)
class RejectsUnit:
    """Outer-archive members the driver already knows are unusable."""

    records: tuple[InputRecord, ...]


def _list_outer(path: Path) -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(path, "r:") as tf:  # "r:" = uncompressed only: it must be seekable
            # Headers only, but the 50,000-member val tar takes a while on a slow disk.
            return list(tqdm(tf, desc=f"listing {path.name}", unit=" members", disable=None,
                             leave=False))
    except _ARCHIVE_ERRORS as err:
        raise ValueError(f"--input: {path}: not a readable uncompressed tar ({err})") from None


def _reject_record(split: str, tar: Path, name: str, reason: str, detail: str,
                   seen: set) -> InputRecord:
    key = f"{split}/_unexpected/{name}"
    n = 1
    while key in seen:  # a repeated or odd name still needs a unique key
        n += 1
        key = f"{split}/_unexpected/{name}#{n}"
    seen.add(key)
    return InputRecord(key=key, split=split, label=-1, source=f"{tar}!{name}", locator=None,
                       reject=(reason, detail))


class TarSource(Source):
    name = "imagenet-tar"

    def __init__(self, input_path: str, synsets_file: Optional[str] = None,
                 synset_words_file: Optional[str] = None,
                 val_ground_truth_file: Optional[str] = None,
                 max_image_bytes: int = 32 * 1024 * 1024):
        self.input = Path(input_path).resolve()
        self.max_image_bytes = max_image_bytes
        self.options = {"synsets_file": synsets_file, "synset_words_file": synset_words_file,
                        "val_ground_truth_file": val_ground_truth_file}
        train_members = val_members = None
        self.train_tar = self.val_tar = None
        if self.input.is_dir():
            if (self.input / TRAIN_TAR).is_file():
                self.train_tar = self.input / TRAIN_TAR
                train_members = _list_outer(self.train_tar)
            if (self.input / VAL_TAR).is_file():
                self.val_tar = self.input / VAL_TAR
                val_members = _list_outer(self.val_tar)
            if not (self.train_tar or self.val_tar):
                raise ValueError(f"--input: {input_path}: holds neither {TRAIN_TAR} nor {VAL_TAR}")
        elif self.input.is_file():
            members = _list_outer(self.input)
            regular = [m for m in members if m.isreg()]
            if regular and all(m.name.endswith(".tar") for m in regular):
                self.train_tar, train_members = self.input, members
            else:
                self.val_tar, val_members = self.input, members
        else:
            raise ValueError(f"--input: {input_path}: no such file or directory")

        inner = {}
        for m in train_members or []:
            name = plain_name(m.name)
            synset = name[:-4] if name.endswith(".tar") else ""
            if member_problem(m) is None and layout.valid_synset(synset) and synset not in inner:
                inner[synset] = m
        if synsets_file:
            synsets = layout.read_synsets(synsets_file)
            if self.train_tar:
                missing = [s for s in synsets if s not in inner]
                if missing:
                    raise ValueError(f"synsets_file: {synsets_file}: {len(missing)} synset(s) have "
                                     f"no inner tar in {self.train_tar}, e.g. {missing[0]!r}")
        elif self.train_tar:
            synsets = sorted(inner)
            if not synsets:
                raise ValueError(f"--input: {self.train_tar}: no <synset>.tar members")
        else:
            raise ValueError("synsets_file: required when there is no train tar to take the "
                             "class list from")
        self._classes = layout.make_classes(synsets, synset_words_file)
        self._label = {c.synset: c.index for c in self._classes}
        self.flat_val = (layout.FlatVal.build(val_ground_truth_file, synsets)
                         if self.val_tar else None)
        self._units = self._plan(train_members or [], inner, val_members or [])

    def _plan(self, train_members, inner, val_members) -> list[Any]:
        units: list[Any] = []
        rejects: list[InputRecord] = []
        seen: set = set()
        for m in train_members:
            name = plain_name(m.name)
            synset = name[:-4] if name.endswith(".tar") else ""
            if inner.get(synset) is m:
                units.append(InnerTarUnit(str(self.train_tar), m.name, synset, m.offset_data,
                                          m.size))
                continue
            reason, detail = member_problem(m) or (
                ("unexpected_name", "repeated member name") if synset in inner else
                ("unexpected_name", "expected <synset>.tar"))
            rejects.append(_reject_record("train", self.train_tar, m.name, reason, detail, seen))
        entries = []
        for m in val_members:
            problem = member_problem(m)
            if problem:
                rejects.append(_reject_record("validation", self.val_tar, m.name, *problem, seen))
            else:
                entries.append((m.name, m.offset_data, m.size))
        units += [ValChunkUnit(str(self.val_tar), tuple(entries[i:i + VAL_CHUNK]))
                  for i in range(0, len(entries), VAL_CHUNK)]
        if rejects:
            units.append(RejectsUnit(tuple(rejects)))
        log.info("%s: %d units (%d rejected outer members)", self.name, len(units), len(rejects))
        return units

    def __getstate__(self):
        # Units travel on their own; the source sent with every task stays small.
        state = dict(self.__dict__)
        state["_units"] = None
        return state

    # -- driver side -----------------------------------------------------------------------
    def classes(self) -> list[ClassInfo]:
        return list(self._classes)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "input": str(self.input),
                "train_tar": str(self.train_tar) if self.train_tar else None,
                "val_tar": str(self.val_tar) if self.val_tar else None, **self.options}

    def units(self) -> list[Any]:
        return list(self._units)

    # -- executor side ---------------------------------------------------------------------
    def records(self, unit: Any) -> Iterator[InputRecord]:
        if isinstance(unit, RejectsUnit):
            yield from unit.records
        elif isinstance(unit, InnerTarUnit):
            yield from self._inner_records(unit)
        elif isinstance(unit, ValChunkUnit):
            seen: set = set()
            for name, offset, size in unit.entries:
                base = plain_name(name)
                synset, label, reject = self.flat_val.classify(base)
                yield self._member_record("validation", unit.tar, name, base, synset, label,
                                          offset, size, reject, seen)
        else:
            raise TypeError(f"{self.name}: unknown unit {unit!r}")

    def _member_record(self, split, source, name, base, synset, label, offset, size, reject,
                       seen) -> InputRecord:
        key = layout.image_key(split, synset, base)
        if key in seen:
            reject, key = ("unexpected_name", "repeated member name"), f"{key}#{offset}"
        seen.add(key)
        if reject is None and size > self.max_image_bytes:
            reject = ("too_large", f"{size} bytes > max_image_bytes {self.max_image_bytes}")
        return InputRecord(key=key, split=split, label=label if reject is None else -1,
                           source=f"{source}!{name}", locator=(offset, size), reject=reject)

    def _inner_records(self, unit: InnerTarUnit) -> Iterator[InputRecord]:
        label = self._label.get(unit.synset)
        source = f"{unit.tar}!{unit.member}"
        seen: set = set()
        with open(unit.tar, "rb") as fh:
            try:
                with tarfile.open(fileobj=Window(fh, unit.offset, unit.size), mode="r:") as tf:
                    for m in tf:
                        base = plain_name(m.name)
                        reject = member_problem(m)
                        if reject is None and layout.name_problem(base):
                            reject = ("unexpected_name", layout.name_problem(base))
                        if reject is None and m.offset_data + m.size > unit.size:
                            # tarfile stops quietly at a cut-off archive; the data must not be
                            # read past the window, from the next outer member.
                            reject = ("truncated", "member data runs past the end of the inner tar")
                        if reject is None and label is None:
                            reject = ("no_label",
                                      f"synset {unit.synset!r} is not in the class list")
                        if reject and reject[0] == "unsafe_member":
                            base = f"_unsafe/{m.name}"
                        yield self._member_record("train", source, m.name, base, unit.synset,
                                                  -1 if label is None else label,
                                                  unit.offset + m.offset_data, m.size, reject, seen)
            except _ARCHIVE_ERRORS as err:
                # Not a tar, or damaged part-way: the members read so far stand, the rest of the
                # inner archive is one quarantined input.
                yield InputRecord(key=f"train/{unit.synset}/_archive_error", split="train",
                                  label=-1, source=source, locator=None,
                                  reject=("error", f"unreadable inner tar: {err}"))

    @contextlib.contextmanager
    def open_unit(self, unit: Any) -> Iterator[Loader]:
        if isinstance(unit, RejectsUnit):
            yield self.load
            return
        with open(unit.tar, "rb") as fh:
            def load(record: InputRecord) -> bytes:
                offset, size = record.locator
                if size > self.max_image_bytes:
                    raise Rejected("too_large",
                                   f"{size} bytes > max_image_bytes {self.max_image_bytes}")
                fh.seek(offset)
                data = fh.read(size)
                if len(data) != size:
                    raise Rejected("truncated", f"archive ends after {len(data)} of {size} bytes")
                return data
            yield load

    def load(self, record: InputRecord) -> bytes:
        raise Rejected("error", f"{record.source}: no data to read")
