"""Parquet shards of JPEG images: the schema, a byte-bounded streaming writer and reader.

Row groups are cut by accumulated bytes, not by row count, so a reader that streams one row group
at a time never holds more than about `row_group_bytes` of images, whatever their size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from etl.records import ImageRow

DEFAULT_ROW_GROUP_BYTES = 32 * 1024 * 1024

# The dataset contract's columns (docs/ARCHITECTURE.md), plus filename and class_text so that
# Parquet carries everything the TFRecord Example does (image/filename, image/class/text).
SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),
    pa.field("synset", pa.string(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("filename", pa.string(), nullable=False),
    pa.field("class_text", pa.string(), nullable=False),
])
COLUMNS = tuple(SCHEMA.names)

_WRITER_OPTIONS: dict[str, Any] = dict(
    # JPEG bytes do not compress and keys are unique: skip the work for both.
    compression={"key": "snappy", "image": "none", "label": "snappy", "synset": "snappy",
                 "height": "snappy", "width": "snappy", "filename": "snappy",
                 "class_text": "snappy"},
    use_dictionary=["synset", "class_text", "label", "height", "width"],
    # Page CRCs let a reader detect a flipped bit without the manifest's sha256.
    write_page_checksum=True,
    write_statistics=["label", "height", "width"],
)


class ParquetShardError(ValueError):
    """A Parquet file that cannot be read as an image shard; the message names the file."""


def _row_bytes(row: ImageRow) -> int:
    return (len(row.jpeg) + len(row.key) + len(row.synset) + len(row.filename)
            + len(row.class_text) + 12)


def _table(rows: list[ImageRow]) -> pa.Table:
    return pa.Table.from_pydict({
        "key": [r.key for r in rows],
        "image": [r.jpeg for r in rows],
        "label": [r.label for r in rows],
        "synset": [r.synset for r in rows],
        "height": [r.height for r in rows],
        "width": [r.width for r in rows],
        "filename": [r.filename for r in rows],
        "class_text": [r.class_text for r in rows],
    }, schema=SCHEMA)


def write_parquet(rows: Iterable[ImageRow], sink: str | os.PathLike | BinaryIO,
                  row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES) -> int:
    """Stream rows into a Parquet file (path or writable binary file object); returns the count.

    At most about `row_group_bytes` of rows are buffered; each buffer becomes one row group.
    An empty `rows` still writes a valid file with the schema and zero rows.
    """
    if row_group_bytes < 1:
        raise ValueError(f"row_group_bytes must be positive, got {row_group_bytes}")
    sink_arg = str(sink) if isinstance(sink, (str, os.PathLike)) else sink
    count = 0
    buffer: list[ImageRow] = []
    buffered = 0
    with pq.ParquetWriter(sink_arg, SCHEMA, **_WRITER_OPTIONS) as writer:
        for row in rows:
            if row.label < 0:
                raise ValueError(f"row {row.key!r}: label {row.label} is negative")
            buffer.append(row)
            buffered += _row_bytes(row)
            count += 1
            if buffered >= row_group_bytes:
                writer.write_table(_table(buffer), row_group_size=len(buffer))
                buffer, buffered = [], 0
        if buffer or count == 0:
            writer.write_table(_table(buffer), row_group_size=max(len(buffer), 1))
    return count


def open_parquet(path: str | os.PathLike, verify_checksums: bool = True) -> pq.ParquetFile:
    """Open a shard, reading its footer; ParquetShardError names the file on failure."""
    try:
        return pq.ParquetFile(str(path), page_checksum_verification=verify_checksums)
    except (OSError, pa.ArrowException) as err:
        raise ParquetShardError(f"{path}: unreadable Parquet footer/metadata: {err}") from None


def iter_parquet(path: str | os.PathLike, columns: Sequence[str] | None = None,
                 verify_checksums: bool = True) -> Iterator[dict]:
    """Rows as dicts, one row group in memory at a time."""
    path = Path(path)
    pf = open_parquet(path, verify_checksums)
    if columns is not None:
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ParquetShardError(f"{path}: no column(s) {missing}; has {pf.schema_arrow.names}")
        columns = list(columns)
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as err:
            raise ParquetShardError(f"{path}: row group {group} unreadable: {err}") from None
        yield from table.to_pylist()
