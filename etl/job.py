"""The Spark job of `bigticket etl prepare`: sources -> processed images -> shards + manifest.

Plan of the job (each step is what makes a guarantee of the dataset contract hold):
1. The driver asks the source for its classes and units of work (cheap: no pixel is read).
2. Enumerate and shuffle: executors list every unit's inputs (names and locators only, no pixels),
   key each small record by its shard and seeded in-shard order, and shuffle it into one partition
   per shard, sorted. The driver then counts that shuffled output per split and checks keys are
   unique (equal keys meet in one shard, side by side). This count is independent of what gets
   written, so the final reconciliation inputs == written + quarantined can actually fail.
3. Each shard task reads the same shuffle output again (Spark reuses the map output: nothing is
   enumerated twice), then reads, decodes, converts and resizes its inputs (pure functions of
   etl.images) and streams them into its shard file(s) under temporary names, renames them, then
   commits a sidecar (counts, checksums, quarantined inputs). Shards a previous run committed are
   not run at all. A retried or speculative attempt rewrites identical bytes, so the last rename
   is harmless.
4. The driver reads the committed sidecars (not accumulators), reconciles, writes quarantine.jsonl,
   refuses to publish a split without records or with too much quarantined (etl.manifest.check_yield:
   the work stays for a re-run), then writes manifest.json and finally _SUCCESS.

Two Spark jobs and three stages in all: Spark's cost is per task more than per record (a task costs
tens of milliseconds of JVM and Python worker CPU), so the job keeps tasks few; see
bench/etl_throughput.py for the measured overhead.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import logging
import shutil
import sys
import zipimport
from typing import Any, Iterable, Iterator

from common.atomic import read_json, write_json, write_text
from common.paths import DatasetPaths
from common.settings import identity_hash, settings_to_dict
from common.spark import get_spark
from etl import faults
from etl.images import ImageLimits, ResizePolicy, process_image
from etl.manifest import MANIFEST_SCHEMA_VERSION, check_output_dir, check_yield, load_manifest, validate_manifest
from etl.records import SPLITS, ClassInfo, ImageRow, InputRecord, QuarantineEntry, Rejected
from etl.settings import CHECK_ONLY_FIELDS, EtlSettings
from etl.shard_writer import clean_stale_temps, write_shard
from etl.sharding import order_key, shard_of
from etl.sources.registry import make_source

log = logging.getLogger(__name__)

TFRECORD_LABEL_OFFSET = 1  # the reference ImageNet converter numbers labels from 1
# Spark job descriptions (shown in the UI; bench/etl_throughput.py reads stage timings by them).
ENUMERATE_PHASE = "bigticket etl: enumerate and count inputs"
WRITE_PHASE = "bigticket etl: read, decode, resize and write shards"


class EtlError(RuntimeError):
    """The job cannot produce a dataset that honours the contract; the message says why."""


@dataclasses.dataclass(frozen=True)
class _ShardSlot:
    split: str
    index: int
    count: int


def dataset_hash(settings: EtlSettings) -> str:
    """Identity of the dataset a settings object produces; the output path is not part of it."""
    return identity_hash(settings, neutral={"out": ""}, omit=CHECK_ONLY_FIELDS)


# ---------------------------------------------------------------------------- executor functions
# Module-level functions bound with functools.partial, so Spark pickles only what they need.

def _trim_import_caches() -> None:
    """Forget the Python worker's zip importers; they are rebuilt cheaply on the next import.

    PySpark's worker calls importlib.invalidate_caches() at the start of every task, and on
    Python 3.11 that makes each cached zipimporter re-read its whole archive's directory:
    pyspark.zip and py4j's zip under several package folders, and the spark-core jar that Spark
    puts on the workers' PYTHONPATH. Measured: about 0.1 CPU-second per task, more than the task
    itself for a small shard. Modules already imported stay imported; only the finders go.
    """
    cache = sys.path_importer_cache
    for path in [p for p, finder in cache.items() if isinstance(finder, zipimport.zipimporter)]:
        cache.pop(path, None)


def _enumerate_keyed(source, seed: int, slot_of: dict[tuple[str, int], int],
                     shard_counts: dict[str, int], indexed_units: Iterable) -> Iterator[tuple]:
    """((slot, order key), (unit index, record)) for every input of these units.

    A record the job cannot place (unknown split, key not under its split) still goes somewhere,
    to slot 0, so that the count pass sees it and the driver names it; an executor never fails
    the job on a source's mistake.
    """
    _trim_import_caches()
    faults.maybe_fail("enumerate")
    for unit_index, unit in indexed_units:
        for record in source.records(unit):
            shards = shard_counts.get(record.split)
            if shards is None or not record.key.startswith(f"{record.split}/"):
                slot = 0
            else:
                slot = slot_of[(record.split, shard_of(seed, record.split, record.key, shards))]
            yield (slot, order_key(seed, record.split, record.key)), (unit_index, record)


@dataclasses.dataclass
class _SlotSummary:
    """What the count pass learns about one shard's inputs (small: examples are capped)."""

    slot: int
    inputs: int = 0
    strays: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (split, key)
    n_strays: int = 0
    duplicates: list[str] = dataclasses.field(default_factory=list)
    n_duplicates: int = 0


_EXAMPLES = 5  # offending keys an error message names


def _summarise(slot_table: list[_ShardSlot], partition: int, items: Iterator) -> Iterator:
    """Count one shard's inputs; find strays and duplicate keys (adjacent after the sort)."""
    _trim_import_caches()
    slot = slot_table[partition]
    summary = _SlotSummary(partition)
    previous = None
    for (_, order), (_, record) in items:
        if record.split != slot.split or not record.key.startswith(f"{slot.split}/"):
            summary.n_strays += 1
            if len(summary.strays) < _EXAMPLES:
                summary.strays.append((record.split, record.key))
            continue
        summary.inputs += 1
        if order == previous:
            summary.n_duplicates += 1
            if len(summary.duplicates) < _EXAMPLES:
                summary.duplicates.append(record.key)
        previous = order
    return iter([summary])


def _quarantine(record: InputRecord, reason: str, detail: str) -> QuarantineEntry:
    return QuarantineEntry(key=record.key, split=record.split, source=record.source,
                           reason=reason, detail=detail)


def _process_one(record: InputRecord, load, classes: list[ClassInfo], policy: ResizePolicy,
                 quality: int, limits: ImageLimits) -> ImageRow | QuarantineEntry:
    if record.reject is not None:
        return _quarantine(record, *record.reject)
    try:
        encoded = process_image(load(record), policy, quality, limits)
    except Rejected as rejected:
        return _quarantine(record, rejected.reason, rejected.detail)
    except Exception as exc:  # anything else is still accounted for, never a crashed job
        return _quarantine(record, "error", f"{type(exc).__name__}: {exc}")
    info = classes[record.label]
    return ImageRow(key=record.key, split=record.split, label=record.label, synset=info.synset,
                    class_text=info.name, filename=record.key.rsplit("/", 1)[-1],
                    jpeg=encoded.jpeg, height=encoded.height, width=encoded.width)


class _UnitLoaders:
    """Open units (archive handles, parsed batches) of one task, least recently used closed first.

    A shard's records come from many units in seeded order; keeping a few open avoids reopening
    one per record, and the bound keeps file handles and memory in check.
    """

    def __init__(self, source, units: list, capacity: int = 32):
        self._source, self._units, self._capacity = source, units, capacity
        self._open: collections.OrderedDict[int, tuple[contextlib.ExitStack, Any]] = \
            collections.OrderedDict()

    def loader(self, unit_index: int):
        if unit_index in self._open:
            self._open.move_to_end(unit_index)
            return self._open[unit_index][1]
        if len(self._open) >= self._capacity:
            self._open.popitem(last=False)[1][0].close()
        stack = contextlib.ExitStack()
        load = stack.enter_context(self._source.open_unit(self._units[unit_index]))
        self._open[unit_index] = (stack, load)
        return load

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][0].close()


@dataclasses.dataclass(frozen=True)
class _ImageJob:
    """What a shard task needs to turn records into images (pickled once per task)."""

    source: Any
    units: list
    classes: list[ClassInfo]
    policy: ResizePolicy
    quality: int
    limits: ImageLimits


def _write_partition(root: str, slot_table: list[_ShardSlot], formats: tuple[str, ...],
                     dataset_id: str, job: _ImageJob, partition: int,
                     items: Iterator) -> Iterator[str]:
    _trim_import_caches()
    faults.maybe_fail("write")
    slot = slot_table[partition]
    paths = DatasetPaths(root)
    sidecar = paths.shard_sidecar(slot.split, slot.index, slot.count)
    if sidecar.exists():  # committed by an earlier attempt or run
        return iter([str(sidecar)])
    quarantined: list[QuarantineEntry] = []
    loaders = _UnitLoaders(job.source, job.units)

    def rows() -> Iterator[ImageRow]:
        for _, (unit_index, record) in items:
            value = _process_one(record, loaders.loader(unit_index), job.classes, job.policy,
                                 job.quality, job.limits)
            if isinstance(value, QuarantineEntry):
                quarantined.append(value)
            else:
                yield value

    try:
        files = write_shard(rows(), paths, slot.split, slot.index, slot.count, formats,
                            label_offset=TFRECORD_LABEL_OFFSET)
    finally:
        loaders.close()
    faults.maybe_fail("commit")  # between the shard rename and its sidecar: the worst moment to die
    write_json(sidecar, {
        "dataset": dataset_id, "split": slot.split, "index": slot.index, "count": slot.count,
        "files": files, "records": files[0]["records"],
        "quarantine": [q.to_json() for q in sorted(quarantined, key=lambda q: q.key)],
    })
    return iter([str(sidecar)])


# ---------------------------------------------------------------------------------- the driver

def _existing_dataset(paths: DatasetPaths, dataset_id: str) -> dict | None:
    """The manifest of a finished identical dataset, or None; refuses to mix different settings."""
    if paths.success.exists():
        manifest = load_manifest(paths.root)
        if manifest.get("settings_hash") != dataset_id:
            raise EtlError(f"{paths.root} already holds a different dataset (settings hash "
                           f"{manifest.get('settings_hash')}, these settings give {dataset_id}); "
                           "choose another --out or delete it")
        return manifest
    for sidecar in sorted(paths.staging.glob("*/*.json")) if paths.staging.exists() else []:
        found = read_json(sidecar).get("dataset")
        if found != dataset_id:
            raise EtlError(f"{paths.root} holds shards of an unfinished run with other settings "
                           f"({sidecar} has dataset {found}, these settings give {dataset_id}); "
                           "choose another --out or delete it")
    return None


def _slot_table(settings: EtlSettings, splits: list[str]) -> list[_ShardSlot]:
    return [_ShardSlot(split, i, settings.shards_for(split))
            for split in splits for i in range(settings.shards_for(split))]


def _slot_partition(key: tuple) -> int:
    return key[0]


def _consume(items: Iterable) -> list:
    return list(items)


def _check_inputs(source_name: str, slot_table: list[_ShardSlot],
                  summaries: list[_SlotSummary]) -> dict[str, int]:
    """Inputs per split from the count pass; refuses strays and duplicate keys, naming a few."""
    if sorted(s.slot for s in summaries) != list(range(len(slot_table))):
        raise EtlError(f"the count pass returned slots {sorted(s.slot for s in summaries)} "
                       f"for {len(slot_table)} shards")
    strays = [x for s in summaries for x in s.strays]
    unknown = sorted({split for split, _ in strays if split not in SPLITS})
    if unknown:
        raise EtlError(f"source {source_name} produced unknown splits {unknown}")
    if strays:
        split, key = strays[0]
        raise EtlError(f"source {source_name} produced {sum(s.n_strays for s in summaries)} "
                       f"keys outside their split, e.g. {key!r} in split {split!r}; every key must "
                       f"start with '<split>/'")
    n_duplicates = sum(s.n_duplicates for s in summaries)
    if n_duplicates:
        examples = sorted(k for s in summaries for k in s.duplicates)[:_EXAMPLES]
        raise EtlError(f"source {source_name} produced {n_duplicates} duplicate input keys "
                       f"(e.g. {', '.join(examples)}); every input must have a unique key")
    inputs: dict[str, int] = {}
    for summary in summaries:
        split = slot_table[summary.slot].split
        inputs[split] = inputs.get(split, 0) + summary.inputs
    return inputs


def _enumerate_and_count(sc, source, units: list, slot_table: list[_ShardSlot], seed: int,
                         source_name: str):
    """Step 2 of the plan: the shuffled, sorted records (an RDD with one partition per slot of
    `slot_table`) and the number of inputs per split, from one Spark job."""
    # Every split gets its slots up front (the count comes later, from the same shuffle); a split
    # without inputs just leaves its slots empty and they are never written.
    slot_of = {(s.split, s.index): i for i, s in enumerate(slot_table)}
    shard_counts = {s.split: s.count for s in slot_table}
    # Two enumeration tasks per core balance uneven units; more would only add per-task cost.
    n_slices = max(1, min(len(units), sc.defaultParallelism * 2))
    sc.setJobDescription(ENUMERATE_PHASE)
    shuffled = (sc.parallelize(list(enumerate(units)), n_slices)
                .mapPartitions(functools.partial(_enumerate_keyed, source, seed, slot_of,
                                                 shard_counts))
                .repartitionAndSortWithinPartitions(numPartitions=len(slot_table),
                                                    partitionFunc=_slot_partition))
    summaries = shuffled.mapPartitionsWithIndex(
        functools.partial(_summarise, slot_table)).collect()
    return shuffled, _check_inputs(source_name, slot_table, summaries)


def prepare(settings: EtlSettings, master: str | None = None, spark=None) -> dict:
    """Run (or finish, or skip) the ETL job; returns the dataset's manifest."""
    check_output_dir(settings.out, settings.input)
    paths = DatasetPaths(settings.out)
    dataset_id = dataset_hash(settings)
    finished = _existing_dataset(paths, dataset_id)
    if finished is not None:
        log.info("%s is already complete (dataset %s): nothing to do", paths.root, dataset_id)
        return finished

    source = make_source(settings)
    classes = source.classes()
    units = source.units()
    if not classes:
        raise EtlError(f"--input {settings.input}: the source found no classes")
    if not units:
        raise EtlError(f"--input {settings.input}: the source found no inputs")
    log.info("source %s: %d classes, %d units of work", settings.source, len(classes), len(units))

    if spark is None:
        spark = get_spark("bigticket-etl", master)
    slot_table = _slot_table(settings, list(SPLITS))
    shuffled, inputs = _enumerate_and_count(spark.sparkContext, source, units, slot_table,
                                            settings.seed, settings.source)
    splits = [s for s in SPLITS if inputs.get(s, 0) > 0]
    log.info("inputs: %s", ", ".join(f"{s}={inputs[s]}" for s in splits))

    todo = [i for i, s in enumerate(slot_table) if s.split in splits
            and not paths.shard_sidecar(s.split, s.index, s.count).exists()]
    n_slots = sum(1 for s in slot_table if s.split in splits)
    if len(todo) < n_slots:
        log.info("resuming: %d of %d shards already committed", n_slots - len(todo), n_slots)
    for split in splits:
        paths.split_dir(split).mkdir(parents=True, exist_ok=True)
        clean_stale_temps(paths, split)

    image_job = _ImageJob(source, units, classes, ResizePolicy.parse(settings.resize),
                          settings.quality, ImageLimits(max_bytes=settings.max_image_bytes,
                                                        max_pixels=settings.max_image_pixels))
    if todo:
        shuffled.context.setJobDescription(WRITE_PHASE)
        # The same shuffled RDD: Spark skips its map stage and the shard tasks read the shuffle
        # files the count pass already produced. Only the shards still to write get a task.
        writer = shuffled.mapPartitionsWithIndex(functools.partial(
            _write_partition, str(paths.root), slot_table, settings.formats, dataset_id, image_job))
        shuffled.context.runJob(writer, _consume, partitions=todo)
    shuffled.context.setJobDescription(None)

    manifest = _finish(paths, settings, dataset_id, source.describe(), classes,
                       [s for s in slot_table if s.split in splits], inputs)
    check_yield(manifest, settings.max_quarantined_fraction, paths.root)  # before anything is published
    validate_manifest(manifest, paths.root)
    write_json(paths.manifest, manifest)
    paths.success.write_bytes(b"")
    shutil.rmtree(paths.staging, ignore_errors=True)
    log.info("dataset complete: %s", paths.root)
    return manifest


def _finish(paths: DatasetPaths, settings: EtlSettings, dataset_id: str, source_desc: dict,
            classes: list[ClassInfo], slot_table: list[_ShardSlot], inputs: dict[str, int]) -> dict:
    """Reconcile the committed sidecars against the input count; write quarantine.jsonl."""
    splits: dict[str, dict] = {}
    quarantine_lines: list[str] = []
    for split in [s for s in SPLITS if inputs.get(s, 0) > 0]:
        shards: list[dict] = []
        records = 0
        by_reason: dict[str, int] = {}
        for slot in (s for s in slot_table if s.split == split):
            sidecar_path = paths.shard_sidecar(split, slot.index, slot.count)
            if not sidecar_path.exists():
                raise EtlError(f"shard {split}/{slot.index} has no committed output ({sidecar_path})")
            sidecar = read_json(sidecar_path)
            shards.extend(sidecar["files"])
            records += sidecar["records"]
            for entry in sidecar["quarantine"]:
                by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + 1
                quarantine_lines.append(json.dumps(entry, sort_keys=True))
        quarantined = sum(by_reason.values())
        if records + quarantined != inputs[split]:
            raise EtlError(f"split {split}: {inputs[split]} inputs but {records} written + "
                           f"{quarantined} quarantined; refusing to publish an incomplete dataset")
        splits[split] = {"inputs": inputs[split], "records": records, "quarantined": quarantined,
                         "quarantine_by_reason": dict(sorted(by_reason.items())), "shards": shards}
        log.info("split %s: %d inputs = %d written + %d quarantined %s", split, inputs[split],
                 records, quarantined, dict(sorted(by_reason.items())) or "")
    write_text(paths.quarantine, "".join(line + "\n" for line in quarantine_lines))
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings_hash": dataset_id,
        "settings": settings_to_dict(settings),
        "source": source_desc,
        "resize": str(ResizePolicy.parse(settings.resize)),
        "jpeg_quality": settings.quality,
        "formats": list(settings.formats),
        "tfrecord_label_offset": TFRECORD_LABEL_OFFSET,
        "classes": [dataclasses.asdict(c) for c in classes],
        "splits": splits,
    }
