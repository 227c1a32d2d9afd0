"""tf.data readers over a dataset directory written by `etl`, both shard formats.

Pipeline: shard files -> parallel interleave -> (record-level worker shard) -> encoded JPEG bytes
+ label -> cache() (encoded bytes only: decoded pixels would be ~50x larger) -> shuffle ->
batch (still encoded) -> per batch, in parallel: decode, vectorised augmentation -> prefetch.

Pixels leave the pipeline as float32 in [0, 255]; normalisation lives inside the model
(`train.models`), so checkpoints are self-contained.

Determinism, which resumed runs rely on: the shuffle order and every augmentation draw of a fresh
dataset's first pass derive from (seed, epoch, worker) only (seeded shuffle; stateless random ops
seeded by (seed, epoch, worker) and the batch's number in the stream), so epoch e yields the same
batches whether it runs after epoch e-1 in the same process or first in a resumed one.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from common.paths import DatasetPaths
from etl.manifest import DatasetError, load_manifest, manifest_sha256, shard_entries
from etl.parquet_io import iter_parquet

log = logging.getLogger(__name__)

FORMATS = ("tfrecord", "parquet")
AUGMENTATIONS = ("none", "crop", "crop_flip")
# Enough records for a useful shuffle without holding much: the buffer holds encoded JPEGs.
DEFAULT_SHUFFLE_BUFFER = 10_000
_SEED_MIX = 0x9E3779B1  # odd constant to spread (seed, epoch, worker) into distinct seeds
# Decodes in flight within one batch; batches themselves are decoded in parallel (AUTOTUNE).
_DECODE_PARALLEL = 8


@dataclasses.dataclass(frozen=True)
class ShardFile:
    path: Path
    records: int
    bytes: int
    sha256: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    root: Path
    manifest: dict = dataclasses.field(repr=False, compare=False, hash=False)
    manifest_sha256: str
    num_classes: int
    classes: tuple[dict, ...]             # [{index, synset, name}] in label order
    formats: tuple[str, ...]
    records: dict[str, int]               # split -> record count
    shards: dict[str, dict[str, tuple[ShardFile, ...]]] = dataclasses.field(repr=False)  # split -> fmt
    label_offset: int                     # subtracted from TFRecord image/class/label
    image_size: int | None                # square side, or None when sizes vary (shorter:N)

    @property
    def default_format(self) -> str:
        return "tfrecord" if "tfrecord" in self.formats else self.formats[0]

    def shard_files(self, split: str, fmt: str | None = None) -> list[ShardFile]:
        fmt = fmt or self.default_format
        if split not in self.shards:
            raise ValueError(f"{self.root}: dataset has no split {split!r} "
                             f"(has {sorted(self.shards)})")
        if fmt not in self.shards[split]:
            raise ValueError(f"format: dataset {self.root} has no {fmt!r} shards "
                             f"(has {list(self.formats)})")
        return list(self.shards[split][fmt])

    def worker_records(self, split: str, worker_index: int = 0, num_workers: int = 1,
                       fmt: str | None = None) -> int:
        """Records worker `worker_index` of `num_workers` reads (same rule as make_dataset)."""
        files = self.shard_files(split, fmt)
        if num_workers == 1:
            return self.records[split]
        if len(files) >= num_workers:
            return sum(f.records for f in files[worker_index::num_workers])
        total = self.records[split]
        return max(0, math.ceil((total - worker_index) / num_workers))

    def steps(self, split: str, batch_size: int, worker_index: int = 0, num_workers: int = 1,
              drop_remainder: bool = False, fmt: str | None = None) -> int:
        n = self.worker_records(split, worker_index, num_workers, fmt)
        return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def _image_size(resize: str) -> int | None:
    kind, _, size = resize.partition(":")
    return int(size) if kind in ("fixed", "center") else None


def open_dataset(path: str | os.PathLike) -> DatasetInfo:
    """Open a finished dataset directory; DatasetError (a ValueError) names the file at fault.

    Refuses a directory without `_SUCCESS` or whose manifest does not validate (etl.manifest),
    and checks that every listed shard file exists with the recorded size. Contents (sha256,
    CRCs, images) are checked by `bigticket etl verify`: hashing ImageNet's shards on every
    training start costs minutes. A shard damaged in place is found when training reads it
    (`train.damaged_shards`).
    """
    root = Path(path)
    manifest = load_manifest(root)
    shards: dict[str, dict[str, tuple[ShardFile, ...]]] = {}
    for split in manifest["splits"]:
        shards[split] = {}
        for fmt in manifest["formats"]:
            files = []
            for entry in shard_entries(manifest, split, fmt):
                file = root / entry["file"]  # validated by load_manifest: relative, inside root
                try:
                    size = file.stat().st_size
                except FileNotFoundError:
                    raise DatasetError(f"{file}: shard listed in {DatasetPaths(root).manifest} "
                                       f"is missing") from None
                if size != entry["bytes"]:
                    raise DatasetError(f"{file}: {size} bytes on disk but the manifest records "
                                       f"{entry['bytes']} (truncated or replaced shard)")
                files.append(ShardFile(file, entry["records"], entry["bytes"], entry["sha256"]))
            shards[split][fmt] = tuple(files)
    classes = tuple(sorted(manifest["classes"], key=lambda c: c["index"]))
    return DatasetInfo(
        root=root,
        manifest=manifest,
        manifest_sha256=manifest_sha256(root),
        num_classes=len(classes),
        classes=classes,
        formats=tuple(manifest["formats"]),
        records={s: manifest["splits"][s]["records"] for s in manifest["splits"]},
        shards=shards,
        label_offset=manifest["tfrecord_label_offset"],
        image_size=_image_size(manifest["resize"]),
    )


# ---------------------------------------------------------------------------------------------
# encoded records (cached)

def _parquet_rows(path):
    path = path.decode() if isinstance(path, bytes) else str(path)
    for row in iter_parquet(path, columns=("image", "label")):
        yield row["image"], row["label"]


@functools.lru_cache(maxsize=16)
def _encoded(files: tuple[str, ...], fmt: str, label_offset: int, worker_index: int,
             num_workers: int, cache: bool):
    """(jpeg bytes, label int32) of `files`, record-sharded when num_workers > 1.

    Memoised so that every epoch's pipeline reuses the same cached dataset: in eager mode the
    in-memory cache belongs to this dataset object, and each epoch's shuffle is built on top.
    """
    import tensorflow as tf

    AUTOTUNE = tf.data.AUTOTUNE
    names = tf.data.Dataset.from_tensor_slices(list(files))
    cycle = max(1, min(len(files), 8))
    if fmt == "tfrecord":
        spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
                "image/class/label": tf.io.FixedLenFeature([], tf.int64)}

        def parse(serialized):
            ex = tf.io.parse_single_example(serialized, spec)
            return ex["image/encoded"], tf.cast(ex["image/class/label"] - label_offset, tf.int32)

        ds = names.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
                              cycle_length=cycle, block_length=1, num_parallel_calls=AUTOTUNE,
                              deterministic=True)
        if num_workers > 1:
            ds = ds.shard(num_workers, worker_index)
        ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)
    elif fmt == "parquet":
        signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32))
        ds = names.interleave(
            lambda f: tf.data.Dataset.from_generator(_parquet_rows, args=(f,),
                                                     output_signature=signature),
            cycle_length=cycle, block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)
        if num_workers > 1:
            ds = ds.shard(num_workers, worker_index)
    else:
        raise ValueError(f"format: unknown shard format {fmt!r} (known: {', '.join(FORMATS)})")
    return ds.cache() if cache else ds


def _select_files(info: DatasetInfo, split: str, fmt: str | None,
                  shard_files: Sequence[str | os.PathLike] | None) -> tuple[list[str], str]:
    if shard_files is None:
        fmt = fmt or info.default_format
        return [str(f.path) for f in info.shard_files(split, fmt)], fmt
    # Only the dataset's own shards: a path handed over by a Spark task is not trusted blindly.
    known = {}
    for f_fmt in info.formats:
        for f in info.shard_files(split, f_fmt):
            known[f.path.resolve()] = f_fmt
    chosen, fmts = [], set()
    for p in shard_files:
        resolved = Path(p).resolve()
        if resolved not in known:
            raise ValueError(f"shard_files: {p} is not a {split!r} shard of dataset {info.root}")
        chosen.append(str(resolved))
        fmts.add(known[resolved])
    if len(fmts) > 1 or (fmt and fmts and fmt not in fmts):
        raise ValueError(f"shard_files: mixed or unexpected formats {sorted(fmts)} (fmt={fmt!r})")
    return chosen, fmt or (fmts.pop() if fmts else info.default_format)


# ---------------------------------------------------------------------------------------------
# decode and augment, a batch at a time

def _decode_one(jpeg, input_size: int, stored_size: int | None):
    """One JPEG -> uint8 [side, side, 3]: the stored square (resized later, per batch), or for
    datasets of varying sizes (shorter:N) the centre square resized to float32 input_size."""
    import tensorflow as tf

    image = tf.io.decode_jpeg(jpeg, channels=3)
    if stored_size is None:
        # Non-square images: centre square first, so nothing is distorted.
        shape = tf.shape(image)
        side = tf.minimum(shape[0], shape[1])
        image = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2,
                                              (shape[1] - side) // 2, side, side)
        image = tf.image.resize(tf.cast(image, tf.float32), [input_size, input_size],
                                method="bilinear")
        return tf.ensure_shape(image, [input_size, input_size, 3])
    return tf.ensure_shape(image, [stored_size, stored_size, 3])


def _decode_batch(jpegs, input_size: int, stored_size: int | None):
    """[n] JPEG strings -> [n, side, side, 3]: uint8 at the stored side, or float32 when a
    resize to input_size was needed (varying stored sizes); see _to_input for the rest.

    One tf.data function call per batch instead of per record: at small image sizes the
    per-element dispatch cost as much as the decode itself (bench/train_throughput.py, part a).
    """
    import tensorflow as tf

    side = input_size if stored_size is None else stored_size
    dtype = tf.float32 if stored_size is None else tf.uint8
    return tf.map_fn(lambda j: _decode_one(j, input_size, stored_size), jpegs,
                     fn_output_signature=tf.TensorSpec([side, side, 3], dtype),
                     parallel_iterations=_DECODE_PARALLEL)


def _to_input(images, input_size: int):
    """A decoded (and augmented) batch -> float32 [n, input_size, input_size, 3] in [0, 255].

    Augmentation runs before this, on the decoded pixels: uint8 in the common case of shards
    stored at the input size (a quarter of the bytes to move); when a fixed-size dataset is
    resized here, the crop was taken at the stored size (the same 1/8 of the side)."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    if images.shape[1] != input_size:
        images = tf.image.resize(images, [input_size, input_size], method="bilinear")
    return images


def _reflect(coords, side: int):
    """Index into the image of each coordinate of its reflect-padded version (|pad| < side)."""
    import tensorflow as tf

    return (side - 1) - tf.abs((side - 1) - tf.abs(coords))


def _augment_batch(images, seed, augment: str):
    """Pad-and-random-crop (pad 1/8 of the side: 4 px at 32, as in the CIFAR ResNet recipe,
    at least 1 px for tiny images) and an optional horizontal flip, for a whole batch at once;
    per-image offsets and flips are stateless draws from `seed` (shape [2]).

    Padding (reflect), crop and flip are all index arithmetic feeding one gather: no padded
    copy, no per-image ops (MirrorPad and a flip select cost more than the gather itself).
    """
    import tensorflow as tf

    if augment == "none":
        return images
    side = images.shape[1]
    pad = max(1, side // 8)
    n = tf.shape(images, out_type=tf.int64)[0]
    shifts = tf.random.stateless_uniform([n, 2], seed=seed, minval=0, maxval=2 * pad + 1,
                                         dtype=tf.int64) - pad
    grid = tf.range(side, dtype=tf.int64)[tf.newaxis, :]
    rows = _reflect(shifts[:, :1] + grid, side)                          # [n, side]
    cols = shifts[:, 1:] + grid
    if augment == "crop_flip":
        flip = tf.random.stateless_uniform(
            [n], seed=tf.random.experimental.stateless_fold_in(seed, 1)) < 0.5
        cols = tf.where(flip[:, tf.newaxis], tf.reverse(cols, axis=[1]), cols)
    cols = _reflect(cols, side)
    index = ((tf.range(n)[:, tf.newaxis, tf.newaxis] * side + rows[:, :, tf.newaxis]) * side
             + cols[:, tf.newaxis, :])                                   # [n, side, side]
    return tf.gather(tf.reshape(images, [-1, images.shape[-1]]), index)


@functools.lru_cache(maxsize=32)
def _batch_transform(input_size: int, stored_size: int | None, augment: str):
    """[n] JPEG strings, seed [2] -> float32 pixels: one traced function per (sizes, augment),
    reused by every dataset built in this process (a new dataset per epoch or per Spark round
    then calls it instead of tracing the decode loop again)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([2], tf.int64)])
    def transform(jpegs, seed):
        images = _augment_batch(_decode_batch(jpegs, input_size, stored_size), seed, augment)
        return _to_input(images, input_size)

    return transform


def epoch_seed(seed: int, epoch: int, worker_index: int = 0) -> int:
    """A distinct 31-bit seed per (seed, epoch, worker): reproducible across processes."""
    return ((seed * _SEED_MIX) ^ (epoch * 1_000_003) ^ (worker_index * 7919)) & 0x7FFFFFFF


def make_dataset(info: DatasetInfo, split: str, *, batch_size: int, training: bool,
                 input_size: int, fmt: str | None = None,
                 shard_files: Sequence[str | os.PathLike] | None = None, worker_index: int = 0,
                 num_workers: int = 1, seed: int = 0, epoch: int = 0, cache: bool = True,
                 drop_remainder: bool = False, repeat: bool = False,
                 augment: str = "crop_flip", shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
    """A tf.data.Dataset of (float32 image [input_size, input_size, 3] in [0, 255], int32 label).

    - `worker_index/num_workers`: shard by file when there are at least as many files as
      workers, else by record; workers never share a record.
    - `shard_files`: exactly these shard paths (must belong to `split` of this dataset), e.g. the
      ones a Spark task was given; worker sharding still applies on top (usually num_workers=1).
    - `training`: shuffle (seeded by seed, epoch, worker) and augment; otherwise the records in
      file order, each exactly once (never repeated unless `repeat`).
    - `epoch`: selects the shuffle order and augmentation draws, so epochs are reproducible.
    - `repeat`: an endless stream (training reshuffles each pass, deterministically). Without
      it, re-iterating the dataset replays the same epoch: make one dataset per epoch.
    """
    import tensorflow as tf

    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} must be in 0..{num_workers - 1}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment: {augment!r} is not one of {AUGMENTATIONS}")
    files, fmt = _select_files(info, split, fmt, shard_files)
    if not files:
        raise ValueError(f"{info.root}: no {fmt} shard files for split {split!r}")
    by_record = num_workers > 1 and len(files) < num_workers
    if num_workers > 1 and not by_record:
        files = files[worker_index::num_workers]
    ds = _encoded(tuple(files), fmt, info.label_offset,
                  worker_index if by_record else 0, num_workers if by_record else 1, cache)
    sizes = {str(f.path.resolve()): f.records for f in info.shard_files(split, fmt)}
    records = sum(sizes[str(Path(f).resolve())] for f in files)
    if by_record:
        records = max(0, math.ceil((records - worker_index) / num_workers))
    # The manifest's count, asserted: Keras then knows the epoch length, and a shard holding
    # other than its recorded number of records fails loudly instead of skewing an epoch.
    ds = ds.apply(tf.data.experimental.assert_cardinality(records))

    AUTOTUNE = tf.data.AUTOTUNE
    if training:
        seed0 = epoch_seed(seed, epoch, worker_index)
        # Without repeat, every iterator of this dataset yields the same order and draws, fixed
        # by seed0 (Keras may open an iterator before the one it trains on, under a
        # tf.distribute strategy). With repeat, each pass reshuffles, and the whole stream is
        # fixed by seed0. Augmentation draws are keyed by (seed0, batch number in the stream).
        ds = ds.shuffle(shuffle_buffer, seed=seed0, reshuffle_each_iteration=repeat)
    if repeat:
        ds = ds.repeat()
    # Batch the encoded bytes first, then decode and augment whole batches (vectorised).
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    to_pixels = _batch_transform(input_size, info.image_size, augment if training else "none")
    if training:
        ds = ds.enumerate().map(
            lambda index, rec: (to_pixels(rec[0], tf.stack([tf.constant(seed0, tf.int64), index])),
                                rec[1]),
            num_parallel_calls=AUTOTUNE, deterministic=True)
    else:
        no_seed = tf.zeros([2], tf.int64)
        ds = ds.map(lambda jpegs, labels: (to_pixels(jpegs, no_seed), labels),
                    num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    # We shard ourselves (above); tf.distribute must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def describe(info: DatasetInfo) -> dict[str, Any]:
    """A small JSON-able summary for logs and settings.json."""
    return {"root": str(info.root), "manifest_sha256": info.manifest_sha256,
            "num_classes": info.num_classes, "records": dict(info.records),
            "formats": list(info.formats), "image_size": info.image_size}
