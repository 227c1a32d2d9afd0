"""A shard damaged after the ETL job (same size, other bytes), found when training reads it.

Training checks sizes only before it starts (`train.data.open_dataset`); a read error during an
epoch (TensorFlow's DataLossError "corrupted record at N", which names no file) is mapped here to
the shard files whose sha256 no longer matches the manifest, named in one CorruptShardError.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from etl.manifest import DatasetError
from train.data import DatasetInfo, ShardFile

log = logging.getLogger(__name__)

# How a damaged shard surfaces while training: the TensorFlow errors of a tf.data read (also
# inside a Spark task's error text), and pyarrow's from a Parquet page that fails its checksum.
_READ_ERROR_NAMES = ("DataLossError", "InvalidArgumentError", "UnknownError")
_READ_ERROR_TEXT = re.compile(r"DataLossError|corrupted record|CRC|checksum|ArrowInvalid|"
                              r"Parquet|InvalidArgumentError")


class CorruptShardError(DatasetError):
    """A shard of the dataset differs from the manifest while training reads it."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def damaged_shards(info: DatasetInfo, split: str, fmt: str | None = None) -> list[ShardFile]:
    """The shard files of `split` whose size or sha256 differs from the manifest's (reads them
    all: for the error path, not for every start)."""
    damaged = []
    for shard in info.shard_files(split, fmt):
        try:
            if shard.path.stat().st_size != shard.bytes or _sha256(shard.path) != shard.sha256:
                damaged.append(shard)
        except OSError:
            damaged.append(shard)
    return damaged


def _is_read_error(err: BaseException) -> bool:
    if any(t.__name__ in _READ_ERROR_NAMES for t in type(err).__mro__):
        return True
    return type(err).__name__ in ("Py4JJavaError", "PythonException") and bool(
        _READ_ERROR_TEXT.search(str(err)))


def raise_if_damaged(info: DatasetInfo, split: str, fmt: str | None, err: BaseException) -> None:
    """After `err` while reading `split`: CorruptShardError naming the damaged shard files if the
    error is a read error and some shard no longer matches the manifest; else nothing (the
    caller re-raises `err`)."""
    if not _is_read_error(err):
        return
    log.info("reading %s failed; checking its %s shards against the manifest", info.root, split)
    damaged = damaged_shards(info, split, fmt)
    if not damaged:
        return
    found = re.search(r"corrupted record at \d+|[^\n]*(?:CRC|checksum)[^\n]*", str(err))
    detail = f" ({found.group(0).strip()})" if found else ""
    names = ", ".join(str(s.path) for s in damaged[:5]) + (
        f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
    raise CorruptShardError(
        f"{names}: damaged shard{'s' if len(damaged) > 1 else ''} of {split!r}{detail}: the "
        f"contents no longer match the manifest's sha256. Run `bigticket etl verify "
        f"{info.root}` to list every problem, then restore the file(s) or prepare the dataset "
        f"again into a new --out") from None
