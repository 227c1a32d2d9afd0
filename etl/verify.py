"""`bigticket etl verify DIR`: re-read every shard of a dataset and check it against its manifest.

Per shard (a pure function, `verify_shard`, run as one Spark task each): the file exists, its size
and sha256 match, every TFRecord CRC holds / the Parquet footer and page checksums read, the record
count matches, labels are in range, the synset matches the label's class, and every image decodes
to its recorded height and width with 3 channels. Per dataset: `_SUCCESS`, the manifest's own
consistency, no split without records, quarantine.jsonl against the manifest's quarantine counts,
and no unlisted shard files.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from common.paths import DatasetPaths
from common.spark import get_spark
from etl.manifest import DatasetError, empty_split_problems, manifest_problems, read_manifest_json
from etl.parquet_io import COLUMNS, ParquetShardError, iter_parquet, open_parquet
from etl.shard_writer import is_shard_temp
from etl.tfrecord import CorruptRecordError, ProtoDecodeError, decode_example, iter_records

log = logging.getLogger(__name__)

# Our own shards hold resized images; a recorded size above this is corruption, not a photo,
# and is never decoded.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# One broken shard can fail every record; the report names the first few and counts the rest.
MAX_PROBLEMS_PER_SHARD = 10
MAX_QUARANTINE_LINE = 1024 * 1024
_HASH_CHUNK = 1024 * 1024
_TFRECORD_FIELDS = ("image/encoded", "image/height", "image/width", "image/channels",
                    "image/class/label", "image/class/synset", "image/format",
                    "image/colorspace")


@dataclasses.dataclass
class VerifyReport:
    root: str
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    shards_checked: int = 0
    records_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"dataset {self.root}: {'OK' if self.ok else 'FAILED'} "
                 f"({self.shards_checked} shard files, {self.records_checked} records checked, "
                 f"{len(self.problems)} problem(s))"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    __str__ = format  # print(report) shows the readable report, not the dataclass repr


class _Problems:
    """Collects a shard's problems, keeping the first few and counting the rest."""

    def __init__(self, file: str):
        self.file = file
        self.items: list[str] = []
        self.kept = 0
        self.dropped = 0

    def add(self, what: str, always: bool = False) -> None:
        """`always` for the shard-level findings (size, sha256, count) that must never be cut."""
        if always:
            self.items.append(f"{self.file}: {what}")
        elif self.kept < MAX_PROBLEMS_PER_SHARD:
            self.items.append(f"{self.file}: {what}")
            self.kept += 1
        else:
            self.dropped += 1

    def result(self) -> list[str]:
        if self.dropped:
            return self.items + [f"{self.file}: ... and {self.dropped} more problem(s)"]
        return list(self.items)


def _check_image(jpeg: bytes, height: Any, width: Any, where: str, problems: _Problems) -> None:
    if not isinstance(height, int) or not isinstance(width, int) or height < 1 or width < 1:
        problems.add(f"{where}: recorded size {height!r}x{width!r} is not a positive size")
        return
    if height * width > MAX_IMAGE_PIXELS:
        problems.add(f"{where}: recorded size {height}x{width} exceeds {MAX_IMAGE_PIXELS} pixels")
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(jpeg)) as img:
                if img.format != "JPEG":
                    problems.add(f"{where}: image is {img.format}, not JPEG")
                    return
                if img.size != (width, height):
                    problems.add(f"{where}: image is {img.size[1]}x{img.size[0]} (HxW), "
                                 f"recorded {height}x{width}")
                    return
                if img.mode != "RGB":
                    problems.add(f"{where}: image mode {img.mode}, not 3-channel RGB")
                    return
                img.load()  # full decode: a truncated or corrupt scan fails here
    except Exception as err:  # any decoder failure is a finding, never a crash of the task
        problems.add(f"{where}: image does not decode: {type(err).__name__}: {err}")


def _check_label(label: int, synset: str, n_classes: int, classes: list[dict], where: str,
                 problems: _Problems) -> None:
    if not 0 <= label < n_classes:
        problems.add(f"{where}: label {label} is not in [0, {n_classes})")
    elif synset != classes[label]["synset"]:
        problems.add(f"{where}: synset {synset!r} but label {label} is class "
                     f"{classes[label]['synset']!r}")


def _first(values: list, kind: type) -> Any:
    return values[0] if len(values) == 1 and isinstance(values[0], kind) else None


def _check_tfrecord(reader: "_HashingReader", manifest: dict, problems: _Problems) -> int:
    offset = manifest["tfrecord_label_offset"]
    classes = manifest["classes"]
    n = 0
    try:
        for n, data in enumerate(iter_records(reader), start=1):
            where = f"record {n - 1}"
            try:
                ex = decode_example(data)
            except ProtoDecodeError as err:
                problems.add(f"{where}: not a tf.train.Example: {err}")
                continue
            missing = [k for k in _TFRECORD_FIELDS if k not in ex]
            if missing:
                problems.add(f"{where}: missing feature(s) {missing}")
                continue
            label = _first(ex["image/class/label"], int)
            synset = _first(ex["image/class/synset"], bytes)
            encoded = _first(ex["image/encoded"], bytes)
            if label is None or synset is None or encoded is None:
                problems.add(f"{where}: label, synset or encoded image is not a single value")
                continue
            if ex["image/channels"] != [3] or ex["image/colorspace"] != [b"RGB"] \
                    or ex["image/format"] != [b"JPEG"]:
                problems.add(f"{where}: channels/colorspace/format are {ex['image/channels']}, "
                             f"{ex['image/colorspace']}, {ex['image/format']}, not 3/RGB/JPEG")
            _check_label(label - offset, synset.decode("utf-8", "replace"), len(classes),
                         classes, f"{where} (image/class/label {label}, offset {offset})",
                         problems)
            _check_image(encoded, _first(ex["image/height"], int),
                         _first(ex["image/width"], int), where, problems)
    except CorruptRecordError as err:
        # The message starts with the path; the report already names the shard.
        problems.add(str(err).removeprefix(f"{reader.name}: "))
    return n


def _check_parquet(path: Path, manifest: dict, expected: int, problems: _Problems) -> int:
    classes = manifest["classes"]
    try:
        pf = open_parquet(path)
    except ParquetShardError as err:
        problems.add(str(err).removeprefix(f"{path}: "))
        return 0
    missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        problems.add(f"missing column(s) {missing}")
        return 0
    if pf.metadata.num_rows != expected:
        problems.add(f"footer says {pf.metadata.num_rows} rows, the manifest {expected}")
    n = 0
    try:
        for n, row in enumerate(iter_parquet(path, ["image", "label", "synset", "height",
                                                    "width"]), start=1):
            where = f"row {n - 1}"
            _check_label(row["label"], row["synset"], len(classes), classes, where, problems)
            _check_image(row["image"], row["height"], row["width"], where, problems)
    except ParquetShardError as err:
        problems.add(str(err).removeprefix(f"{path}: "))
    return n


class _HashingReader:
    """A sequential reader that hashes every byte it hands out."""

    def __init__(self, fh):
        self._fh = fh
        self.name = fh.name
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._digest.update(data)
        return data

    def finish(self) -> str:
        """Hash whatever the checker did not read (after corruption) and return the digest."""
        while self.read(_HASH_CHUNK):
            pass
        return self._digest.hexdigest()


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        digest = hashlib.sha256()
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard(root: str | Path, entry: dict, manifest: dict) -> tuple[list[str], int]:
    """(problems naming the shard file, records read) for one manifest shard entry."""
    problems = _Problems(entry["file"])
    path = Path(root) / entry["file"]
    records = 0
    try:
        if not path.is_file():
            problems.add("missing")
            return problems.result(), 0
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.add(f"{size} bytes, the manifest says {entry['bytes']}", always=True)
        if entry["format"] == "tfrecord":
            # TFRecord is read front to back: hash it on the same pass (half the I/O).
            with open(path, "rb") as fh:
                reader = _HashingReader(fh)
                records = _check_tfrecord(reader, manifest, problems)
                digest = reader.finish()
        else:
            # Parquet is read footer first, so it is hashed in a pass of its own.
            digest = _sha256_file(path)
            records = _check_parquet(path, manifest, entry["records"], problems)
        if digest != entry["sha256"]:
            problems.add(f"sha256 {digest} does not match the manifest's {entry['sha256']}",
                         always=True)
        if records != entry["records"]:
            problems.add(f"holds {records} readable records, the manifest says "
                         f"{entry['records']}", always=True)
    except Exception as err:  # a verifier reports; it never dies on the data it checks
        problems.add(f"cannot be checked: {type(err).__name__}: {err}")
    return problems.result(), records


def verify_shard(root: str | Path, entry: dict, manifest: dict) -> list[str]:
    """Problems of one shard, each naming its file; empty when the shard is sound."""
    return check_shard(root, entry, manifest)[0]


def _quarantine_counts(path: Path, problems: list[str]) -> dict[str, collections.Counter]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(path, "rb") as fh:
        lineno = 0
        # readline with a bound: a corrupt file without newlines is never read whole into memory
        while line := fh.readline(MAX_QUARANTINE_LINE + 1):
            lineno += 1
            if len(line) > MAX_QUARANTINE_LINE:
                problems.append(f"{path.name}:{lineno}: line longer than {MAX_QUARANTINE_LINE}")
                while line and not line.endswith(b"\n"):  # skip the rest of that line
                    line = fh.readline(MAX_QUARANTINE_LINE + 1)
                continue
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                counts[str(item["split"])][str(item["reason"])] += 1
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"{path.name}:{lineno}: not a quarantine entry "
                                f"({type(err).__name__}: {err})")
    return counts


def _check_quarantine(paths: DatasetPaths, manifest: dict, problems: list[str]) -> None:
    expected = {split: info["quarantined"] for split, info in manifest["splits"].items()}
    if not paths.quarantine.is_file():
        if any(expected.values()):
            problems.append(f"{paths.quarantine.name}: missing, but the manifest counts "
                            f"{sum(expected.values())} quarantined input(s)")
        return
    counts = _quarantine_counts(paths.quarantine, problems)
    for split in sorted(set(expected) | set(counts)):
        found = sum(counts.get(split, {}).values())
        if split not in expected:
            problems.append(f"{paths.quarantine.name}: {found} line(s) for split {split!r}, "
                            f"which the manifest does not have")
        elif found != expected[split]:
            problems.append(f"{paths.quarantine.name}: {found} line(s) for split {split!r}, the "
                            f"manifest says quarantined {expected[split]}")
        elif dict(counts.get(split, {})) != {
                r: n for r, n in manifest["splits"][split]["quarantine_by_reason"].items() if n}:
            problems.append(f"{paths.quarantine.name}: reasons for split {split!r} are "
                            f"{dict(counts.get(split, {}))}, the manifest says "
                            f"{manifest['splits'][split]['quarantine_by_reason']}")


def _unlisted_files(paths: DatasetPaths, manifest: dict, report: VerifyReport) -> None:
    listed = {e["file"] for info in manifest["splits"].values() for e in info["shards"]}
    for split in manifest["splits"]:
        split_dir = paths.split_dir(split)
        if not split_dir.is_dir():
            continue
        for entry in sorted(split_dir.iterdir()):
            rel = entry.relative_to(paths.root).as_posix()
            if is_shard_temp(entry.name):
                report.warnings.append(f"{rel}: temporary file of an unfinished write")
            elif entry.name.startswith("part-") and rel not in listed:
                report.problems.append(f"{rel}: shard file not listed in the manifest")


def _run_shards(root: str, entries: list[dict], manifest: dict, master: str | None,
                spark) -> Iterator[tuple[list[str], int]]:
    if spark is None:
        spark = get_spark("bigticket-etl-verify", master=master)
    sc = spark.sparkContext
    shared = sc.broadcast(manifest)  # classes can be large; ship them once per executor
    try:
        # One task per shard: shards are the unit of I/O, and a retried task re-reads one file.
        results = (sc.parallelize(entries, len(entries))
                   .map(lambda e: check_shard(root, e, shared.value))
                   .collect())
    finally:
        shared.unpersist()
    return iter(results)


def verify_dataset(root: str | Path, master: str | None = None, spark=None) -> VerifyReport:
    """Check a whole dataset directory; the shards are read in parallel by Spark tasks."""
    paths = DatasetPaths(Path(root).absolute())
    report = VerifyReport(root=str(paths.root))
    if not paths.root.is_dir():
        report.problems.append(f"{paths.root}: not a directory")
        return report
    if not paths.success.is_file():
        report.problems.append(f"{paths.success.name}: missing (the ETL job did not finish)")
    try:
        manifest = read_manifest_json(paths.root)
    except DatasetError as err:
        report.problems.append(str(err))
        return report
    problems, sound = manifest_problems(manifest, paths.root)
    report.problems += [f"{paths.manifest.name}: {p}" for p in problems]
    if not sound:
        return report

    # A split without records passes every other check, and fails only at training time.
    report.problems += [f"{paths.manifest.name}: {p}" for p in empty_split_problems(manifest)]
    if "train" not in manifest["splits"]:
        report.warnings.append(f"{paths.manifest.name}: no train split (only evaluation can "
                               f"use this dataset)")
    _check_quarantine(paths, manifest, report.problems)
    _unlisted_files(paths, manifest, report)
    entries = [e for info in manifest["splits"].values() for e in info["shards"]]
    log.info("verifying %d shard files of %s", len(entries), paths.root)
    if entries:
        for shard_problems, records in _run_shards(str(paths.root), entries, manifest, master,
                                                   spark):
            report.problems += shard_problems
            report.records_checked += records
            report.shards_checked += 1
    log.info("%s: %d shard files, %d records, %d problem(s)", paths.root,
             report.shards_checked, report.records_checked, len(report.problems))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `bigticket etl verify`."""
    parser.add_argument("dataset", metavar="DIR", help="dataset directory written by etl prepare")
    parser.add_argument("--master", default=None,
                        help="Spark master URL (default: spark-submit's, else local[*])")


def run(args: argparse.Namespace) -> int:
    """Verify, print the report; exit status 0 only if every check holds."""
    report = verify_dataset(args.dataset, master=args.master)
    print(report.format())
    return 0 if report.ok else 1
