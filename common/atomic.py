"""Atomic file writes: write to a temporary sibling, fsync, then rename over the final name.

A reader therefore sees either no file or a complete one, never a partial file, even if the
writer is killed or two speculative attempts race (the last rename wins with identical content).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

# mkstemp makes 0600 files, but outputs are shared on cluster file systems (other users'
# executors, colleagues): give them the mode the umask allows, as open() would. Read once, at
# import, because os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def temp_name(final: Path, tag: str = "") -> Path:
    """A unique hidden sibling of `final`, so that listings of final names never see it."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.{tag}", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file for writing; on clean exit it is fsynced and renamed to `path`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling path for writers that want a file name rather than a file object.

    `suffix` is appended for writers that insist on one (Keras: `.keras`, `.weights.h5`). On clean
    exit the file is fsynced, given the usual mode and renamed to `path`.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    reserved = temp_name(final)
    tmp = reserved.with_name(reserved.name + suffix)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, final)
    finally:
        for leftover in {reserved, tmp}:
            leftover.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as fh:
        return json.load(fh)
