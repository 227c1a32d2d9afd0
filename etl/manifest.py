"""The dataset manifest (schema_version 1): the contract between ETL and training.

`load_manifest` is what readers call: it refuses a directory without `_SUCCESS`, and a manifest
that is missing, not JSON, or inconsistent, with a DatasetError naming the file and the problem.
The ETL job asks this module two more questions about the directory: may it write there at all
(`check_output_dir`), and is what it wrote a dataset worth publishing (`check_yield`: no split
without records, not too much quarantined); `etl verify` asks the second one too.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from common.paths import DatasetPaths, shard_stem
from etl.records import REASONS, SPLITS

MANIFEST_SCHEMA_VERSION = 1  # of manifest.json and the dataset directory it describes
FORMATS = ("tfrecord", "parquet")
# A manifest lists a few thousand shards; anything far larger is not ours.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TOP_LEVEL = {
    "schema_version": int, "created_utc": str, "settings_hash": str, "settings": dict,
    "source": dict, "resize": str, "jpeg_quality": int, "formats": list,
    "tfrecord_label_offset": int, "classes": list, "splits": dict,
}
_SPLIT_FIELDS = {"inputs": int, "records": int, "quarantined": int,
                 "quarantine_by_reason": dict, "shards": list}
_SHARD_FIELDS = {"index": int, "format": str, "file": str, "records": int, "bytes": int,
                 "sha256": str}


class DatasetError(ValueError):
    """A dataset directory that readers must refuse; the message names the path and the problem."""


class OutputDirError(ValueError):
    """An --out the ETL job must not write into; the message names the flag and the folder."""


class DatasetUnusable(RuntimeError):
    """The ETL job ran, but what it wrote is not a usable dataset (a split without records, or more
    quarantined than allowed), so it is not published; the message is a one-screen summary."""


def _is(value: Any, kind: type) -> bool:
    if kind is int:  # JSON true/false would otherwise pass as 1/0
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_fields(obj: Any, fields: dict[str, type], where: str, problems: list[str]) -> bool:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return False
    ok = True
    for name, kind in fields.items():
        if name not in obj:
            problems.append(f"{where}: missing field {name!r}")
            ok = False
        elif not _is(obj[name], kind):
            problems.append(f"{where}.{name}: expected {kind.__name__}, "
                            f"got {type(obj[name]).__name__}")
            ok = False
    return ok


def _safe_relative(file: str, root: Path) -> bool:
    """True if `file` is a relative POSIX path that stays inside `root` (no '..', no links out)."""
    p = PurePosixPath(file)
    if not file or p.is_absolute() or "\\" in file or any(part in ("", "..", ".") for part in
                                                          file.split("/")):
        return False
    root_resolved = root.resolve()
    target = (root / p).resolve()
    return target == root_resolved or root_resolved in target.parents


def manifest_problems(manifest: Any, root: str | Path) -> tuple[list[str], bool]:
    """Every problem of a manifest, and whether its shard entries are sound enough to check.

    The second value is False when the structure is broken (a shard list that cannot be read, a
    file path outside the root): then no shard may be opened. Consistency problems (counts that
    do not add up) leave it True, so that `etl verify` can still name the shard that differs.
    """
    root = Path(root)
    problems: list[str] = []
    if not _check_fields(manifest, _TOP_LEVEL, "manifest", problems):
        return problems, False
    if manifest["schema_version"] != MANIFEST_SCHEMA_VERSION:
        return [f"schema_version {manifest['schema_version']} is not supported "
                f"(this code reads {MANIFEST_SCHEMA_VERSION})"], False
    sound = True
    formats = manifest["formats"]
    if not formats or any(f not in FORMATS for f in formats) or len(set(formats)) != len(formats):
        problems.append(f"formats: expected distinct values of {list(FORMATS)}, got {formats}")
        sound = False
    if not 1 <= manifest["jpeg_quality"] <= 100:
        problems.append(f"jpeg_quality: {manifest['jpeg_quality']} is not in [1, 100]")
    if manifest["tfrecord_label_offset"] < 0:
        problems.append(f"tfrecord_label_offset: {manifest['tfrecord_label_offset']} is negative")
        sound = False

    classes = manifest["classes"]
    if not classes:
        problems.append("classes: empty")
        sound = False
    synsets: set[str] = set()
    for i, cls in enumerate(classes):
        where = f"classes[{i}]"
        if not _check_fields(cls, {"index": int, "synset": str, "name": str}, where, problems):
            sound = False
            continue
        if cls["index"] != i:
            problems.append(f"{where}.index: {cls['index']} but classes must be listed in label "
                            f"order from 0")
            sound = False
        if not cls["synset"] or cls["synset"] in synsets:
            problems.append(f"{where}.synset: {cls['synset']!r} is empty or repeated")
            sound = False
        synsets.add(cls["synset"])

    if not manifest["splits"]:
        problems.append("splits: empty")
        sound = False
    for split, info in manifest["splits"].items():
        where = f"splits.{split}"
        if not _SPLIT_RE.match(split):
            problems.append(f"{where}: not a valid split name")
            sound = False
            continue
        if not _check_fields(info, _SPLIT_FIELDS, where, problems):
            sound = False
            continue
        for name in ("inputs", "records", "quarantined"):
            if info[name] < 0:
                problems.append(f"{where}.{name}: {info[name]} is negative")
        if info["inputs"] != info["records"] + info["quarantined"]:
            problems.append(f"{where}: inputs {info['inputs']} != records {info['records']} + "
                            f"quarantined {info['quarantined']}")
        by_reason = info["quarantine_by_reason"]
        for reason, n in by_reason.items():
            if reason not in REASONS:
                problems.append(f"{where}.quarantine_by_reason: unknown reason {reason!r}")
            if not _is(n, int) or n < 0:
                problems.append(f"{where}.quarantine_by_reason.{reason}: {n!r} is not a count")
        if all(_is(n, int) for n in by_reason.values()) and \
                sum(by_reason.values()) != info["quarantined"]:
            problems.append(f"{where}.quarantine_by_reason: sums to {sum(by_reason.values())}, "
                            f"quarantined is {info['quarantined']}")
        sound &= _check_shards(info["shards"], split, info["records"], formats, root, where,
                               problems)
    return problems, sound


def _check_shards(shards: list, split: str, records: int, formats: list, root: Path, where: str,
                  problems: list[str]) -> bool:
    sound = True
    by_format: dict[str, list[dict]] = {}
    for i, entry in enumerate(shards):
        ewhere = f"{where}.shards[{i}]"
        if not _check_fields(entry, _SHARD_FIELDS, ewhere, problems):
            sound = False
            continue
        if entry["format"] not in formats:
            problems.append(f"{ewhere}: format {entry['format']!r} is not in formats {formats}")
            sound = False
            continue
        if not _safe_relative(entry["file"], root):
            problems.append(f"{ewhere}: file {entry['file']!r} is not a relative path inside "
                            f"the dataset")
            sound = False
            continue
        if entry["records"] < 0 or entry["bytes"] < 0:
            problems.append(f"{entry['file']}: negative records or bytes in the manifest")
        if not _SHA_RE.match(entry["sha256"]):
            problems.append(f"{entry['file']}: sha256 {entry['sha256']!r} is not 64 hex digits")
        by_format.setdefault(entry["format"], []).append(entry)
    for fmt in formats:
        entries = by_format.get(fmt, [])
        if not entries:
            problems.append(f"{where}: no {fmt} shards")
            continue
        count = len(entries)
        indices = sorted(e["index"] for e in entries)
        if indices != list(range(count)):
            problems.append(f"{where}: {fmt} shard indices {indices} are not 0..{count - 1}")
            sound = False
            continue
        for e in entries:
            expected = f"{split}/{shard_stem(e['index'], count)}.{fmt}"
            if e["file"] != expected:
                problems.append(f"{e['file']}: expected the name {expected!r} for {fmt} shard "
                                f"{e['index']} of {count}")
                sound = False
        total = sum(e["records"] for e in entries)
        if total != records:
            problems.append(f"{where}: {fmt} shards hold {total} records, the split says "
                            f"{records}")
    return sound


def validate_manifest(manifest: dict, root: str | Path) -> None:
    """Raise DatasetError listing every problem of the manifest of the dataset at `root`."""
    problems, _ = manifest_problems(manifest, root)
    if problems:
        raise DatasetError(f"{DatasetPaths(root).manifest}: invalid manifest: "
                           + "; ".join(problems))


def read_manifest_json(root: str | Path) -> Any:
    """The parsed manifest.json of `root` (not validated); DatasetError names the file."""
    path = DatasetPaths(root).manifest
    if not path.is_file():
        raise DatasetError(f"{path}: missing manifest (is {root} a bigticket dataset?)")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise DatasetError(f"{path}: {size} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON: {err}") from None


def load_manifest(root: str | Path, require_success: bool = True) -> dict:
    """The validated manifest of the dataset at `root`.

    With require_success (what training uses) a directory without `_SUCCESS` is refused: its ETL
    job has not finished, and its shards may be incomplete.
    """
    paths = DatasetPaths(root)
    if paths.root.is_file():
        raise DatasetError(f"{paths.root}: is a file, not a dataset directory (the directory "
                           f"`bigticket etl prepare --out` wrote)")
    if not paths.root.is_dir():
        raise DatasetError(f"{paths.root}: dataset directory does not exist")
    if require_success and not paths.success.is_file():
        raise DatasetError(f"{paths.success}: missing; the ETL job that writes {paths.root} has "
                           f"not finished (re-run `bigticket etl prepare` to complete it)")
    manifest = read_manifest_json(root)
    validate_manifest(manifest, root)
    return manifest


def manifest_sha256(root: str | Path) -> str:
    """sha256 of manifest.json's bytes: what a training run records to pin its dataset."""
    path = DatasetPaths(root).manifest
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing manifest") from None


def shard_entries(manifest: dict, split: str, fmt: str) -> list[dict]:
    """The shard entries of one split and format, by index."""
    if split not in manifest["splits"]:
        raise DatasetError(f"manifest has no split {split!r} (has {sorted(manifest['splits'])})")
    if fmt not in manifest["formats"]:
        raise DatasetError(f"manifest has no {fmt!r} shards (formats {manifest['formats']})")
    return sorted((e for e in manifest["splits"][split]["shards"] if e["format"] == fmt),
                  key=lambda e: e["index"])


# ------------------------------------------------------------------ where the job may write

_SHARD_FILE_RE = re.compile(r"^part-\d{5}-of-\d{5}\.(tfrecord|parquet)$")


def _foreign_entries(paths: DatasetPaths) -> list[str]:
    """Entries of an output folder that no ETL job of ours leaves (hidden names are temporaries)."""
    ours = {paths.success.name, paths.quarantine.name, paths.staging.name,
            paths.source_cache("x").parent.name}
    foreign = []
    for entry in sorted(paths.root.iterdir()):
        if entry.name.startswith(".") or entry.name in ours:
            continue
        if entry.is_dir() and entry.name in SPLITS:
            foreign += [f"{entry.name}/{child.name}" for child in sorted(entry.iterdir())
                        if not child.name.startswith(".") and not _SHARD_FILE_RE.match(child.name)]
        else:
            foreign.append(entry.name)
    return foreign


def check_output_dir(out: str | Path, input: str | Path | None) -> None:
    """Refuse an --out equal to or inside --input, a file, or a non-empty folder that is neither a
    dataset (manifest.json) nor what an unfinished job of ours leaves (_staging/, _source/, shard
    files and temporaries), so that the job never writes into a source tree or someone's data."""
    out_path = Path(out).expanduser().resolve()
    if input is not None:
        in_path = Path(input).expanduser().resolve()
        if out_path == in_path or in_path in out_path.parents:
            where = "is --input" if out_path == in_path else f"is inside --input {input}"
            raise OutputDirError(f"--out {out}: {where}; the shards would be written into the "
                                 f"source tree (and read back as inputs by the next prepare): "
                                 f"choose a folder outside it")
    if not out_path.exists():
        return
    if not out_path.is_dir():
        raise OutputDirError(f"--out {out}: exists and is not a folder")
    paths = DatasetPaths(out_path)
    if paths.manifest.exists():
        return  # a dataset: the job checks it is the same one before touching it
    foreign = _foreign_entries(paths)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputDirError(f"--out {out}: a non-empty folder that is not a bigticket dataset (no "
                             f"{paths.manifest.name}; {shown} not written by etl prepare): choose "
                             f"a new or empty folder")


# ------------------------------------------------------------ is the result worth publishing

_TOP_REASONS = 5
_DETAIL_CHARS = 160
# What to look at when many inputs fail for one reason (the flags of `bigticket etl prepare`).
REASON_HINTS = {
    "download_error": "check the URLs and the network; hosts on loopback, private or link-local "
                      "addresses are refused unless --allow-private-addresses",
    "unexpected_name": "these entries do not fit the layout --source expects: check --input",
    "no_label": "these inputs have no class: check --val-ground-truth and --synsets-file",
    "too_large": "raise --max-image-bytes if these are genuine images",
    "decompression_bomb": "raise --max-image-pixels if these are genuine images",
    "unsafe_member": "the archive holds links, devices or paths leaving it: check its origin",
}


def empty_split_problems(manifest: dict) -> list[str]:
    """Splits that had inputs but hold no record: nothing can train or evaluate on them."""
    return [f"split {split} is empty: none of its {info['inputs']} input(s) was written"
            for split, info in manifest["splits"].items() if info["records"] == 0]


def yield_problems(manifest: dict, max_quarantined_fraction: float) -> list[str]:
    """Why the splits of a finished job are not worth publishing (empty when they are)."""
    problems = empty_split_problems(manifest)
    for split, info in manifest["splits"].items():
        if info["records"] and info["quarantined"] > max_quarantined_fraction * info["inputs"]:
            problems.append(f"split {split}: {info['quarantined']} of {info['inputs']} inputs "
                            f"quarantined ({info['quarantined'] / info['inputs']:.0%}), more than "
                            f"--max-quarantined-fraction {max_quarantined_fraction:g}")
    return problems


def _first_of_each_reason(path: Path, reasons: set[str]) -> dict[str, dict]:
    """One quarantine entry per reason, read until every reason has one."""
    found: dict[str, dict] = {}
    if not path.is_file():
        return found
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("reason") in reasons - set(found):
                found[entry["reason"]] = entry
                if len(found) == len(reasons):
                    break
    return found


def _describe(entry: dict) -> str:
    return f"{entry.get('source')}: {entry.get('detail')}"


def _shorten(text: str, limit: int = _DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def yield_summary(manifest: dict, problems: list[str], root: str | Path) -> str:
    """The failure screen: what is wrong, the top reasons with an example input each, what to do."""
    paths = DatasetPaths(root)
    splits = manifest["splits"]
    lines = [f"{paths.root}: nothing published (no {paths.success.name}):"]
    lines += [f"  {p}" for p in problems]
    by_reason: dict[str, int] = {}
    for info in splits.values():
        for reason, n in info["quarantine_by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    top = sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))[:_TOP_REASONS]
    if top:
        examples = _first_of_each_reason(paths.quarantine, {r for r, _ in top})
        inputs = sum(info["inputs"] for info in splits.values())
        lines.append(f"top quarantine reasons ({sum(by_reason.values())} of {inputs} inputs):")
        width = max(len(r) for r, _ in top)
        for reason, n in top:
            entry = examples.get(reason)
            example = f"  e.g. {_shorten(_describe(entry))}" if entry else ""
            lines.append(f"  {n:>7}  {reason:<{width}}{example}")
            if reason in REASON_HINTS:
                lines.append(f"  {'':>7}  {'':<{width}}  -> {REASON_HINTS[reason]}")
        lines.append(f"every rejected input, with its reason: {paths.quarantine}")
    if all(info["records"] for info in splits.values()):
        lines.append("to publish it anyway, re-run the same command with a higher "
                     "--max-quarantined-fraction (the work done is kept, nothing is redone)")
    lines.append(f"with other settings, delete {paths.root} or choose another --out first")
    return "\n".join(lines)


def check_yield(manifest: dict, max_quarantined_fraction: float, root: str | Path) -> None:
    """Raise DatasetUnusable (with the summary) unless the job's splits are worth publishing."""
    problems = yield_problems(manifest, max_quarantined_fraction)
    if problems:
        raise DatasetUnusable(yield_summary(manifest, problems, root))
