"""Write one shard in every requested format from a single pass over its rows.

Each format goes to a hidden temporary sibling (`.part-...tfrecord.<random>.tmp`), is fsynced and
then renamed to its final name, so a final name only ever holds a complete file. Two attempts of
the same shard (a retry, a speculative copy) write identical bytes to different temporary names;
whichever renames last wins, with the same content. sha256 and sizes are computed on the bytes as
they are written, so nothing is read back.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import BinaryIO, Iterable

from common.atomic import temp_name
from common.paths import DatasetPaths
from etl.parquet_io import DEFAULT_ROW_GROUP_BYTES, write_parquet
from etl.records import ImageRow
from etl.tfrecord import TFRecordWriter, encode_example

log = logging.getLogger(__name__)

FORMATS = ("tfrecord", "parquet")
# Matches only the temporaries made by common.atomic.temp_name for shard files.
_TEMP_RE = re.compile(r"^\.part-\d{5,}-of-\d{5,}\.(tfrecord|parquet)\..*\.tmp$")


class _HashingFile:
    """A write-only file wrapper that counts bytes and hashes them on the way through."""

    def __init__(self, fh: BinaryIO):
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._fh.write(view)
        self.sha256.update(view)
        self.bytes += len(view)
        return len(view)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self._fh.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        # pyarrow closes its sink when the writer finishes; the real file is closed by us after
        # fsync, so only mark this wrapper closed.
        self.closed = True


class _RowTee:
    """Feeds each row to the TFRecord writer while the Parquet writer pulls the same stream."""

    def __init__(self, rows: Iterable[ImageRow], split: str, tfrecord: TFRecordWriter | None,
                 label_offset: int):
        self._rows = rows
        self._split = split
        self._tfrecord = tfrecord
        self._offset = label_offset
        self.count = 0

    def __iter__(self):
        for row in self._rows:
            if row.split != self._split:
                raise ValueError(f"row {row.key!r} belongs to split {row.split!r}, "
                                 f"not to the shard's split {self._split!r}")
            if self._tfrecord is not None:
                self._tfrecord.write(encode_example(row, self._offset))
            self.count += 1
            yield row


def write_shard(rows: Iterable[ImageRow], dataset: DatasetPaths, split: str, index: int,
                count: int, formats: tuple[str, ...], label_offset: int = 1,
                row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES) -> list[dict]:
    """Write shard `index` of `count` of `split` in each of `formats`; one manifest entry each.

    `rows` is consumed once. On any error the temporaries are removed and nothing is renamed.
    """
    formats = tuple(formats)
    if not formats or any(f not in FORMATS for f in formats) or len(set(formats)) != len(formats):
        raise ValueError(f"formats must be distinct values of {FORMATS}, got {formats!r}")
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    finals = {fmt: dataset.shard(split, index, count, fmt) for fmt in formats}
    split_dir = dataset.split_dir(split)
    split_dir.mkdir(parents=True, exist_ok=True)

    temps: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        try:
            files: dict[str, BinaryIO] = {}
            hashed: dict[str, _HashingFile] = {}
            for fmt in formats:
                temps[fmt] = temp_name(finals[fmt])
                files[fmt] = stack.enter_context(open(temps[fmt], "wb"))
                hashed[fmt] = _HashingFile(files[fmt])
            tfrecord = TFRecordWriter(hashed["tfrecord"]) if "tfrecord" in hashed else None
            tee = _RowTee(rows, split, tfrecord, label_offset)
            if "parquet" in hashed:
                write_parquet(tee, hashed["parquet"], row_group_bytes=row_group_bytes)
            else:
                for _ in tee:
                    pass
            for fmt in formats:
                files[fmt].flush()
                os.fsync(files[fmt].fileno())
        except BaseException:
            stack.close()
            for tmp in temps.values():
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            raise
    for fmt in formats:
        os.replace(temps[fmt], finals[fmt])
    _fsync_dir(split_dir)  # make the renames themselves durable

    entries = []
    for fmt in formats:
        entries.append({
            "index": index,
            "format": fmt,
            "file": finals[fmt].relative_to(dataset.root).as_posix(),
            "records": tee.count,
            "bytes": hashed[fmt].bytes,
            "sha256": hashed[fmt].sha256.hexdigest(),
        })
    log.debug("wrote %s shard %d/%d: %d records in %s", split, index, count, tee.count,
              ", ".join(formats))
    return entries


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_shard_temp(name: str) -> bool:
    """True for the name of a shard temporary (never a final shard name)."""
    return bool(_TEMP_RE.match(name))


def clean_stale_temps(dataset: DatasetPaths, split: str) -> int:
    """Remove shard temporaries left by killed attempts; returns how many were removed.

    Call it from the driver before tasks start: a running attempt's temporary would go too.
    """
    split_dir = dataset.split_dir(split)
    if not split_dir.is_dir():
        return 0
    removed = 0
    for entry in split_dir.iterdir():
        if is_shard_temp(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
    if removed:
        log.info("removed %d stale temporary shard file(s) from %s", removed, split_dir)
    return removed
