"""urls: a text file of `<synset or label><TAB><url>[<TAB>train|validation]` lines.

Blank lines and lines starting with '#' are not inputs. Without the third column the split comes
from a stable hash of (seed, URL) against validation_fraction, so re-runs and list edits keep every
URL in its split. The driver parses the list (it is small next to the images) and hands out chunks
of ready records; tasks download through etl.sources.download.Downloader. Malformed lines,
duplicate URLs and unknown labels are rejected records naming the line number.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional

from etl.records import SPLITS, ClassInfo, InputRecord
from etl.sources import imagenet_layout as layout
from etl.sources.base import Loader, Source
from etl.sources.download import Downloader

log = logging.getLogger(__name__)

CHUNK = 64                       # URLs per task: downloads are slow, keep units small
MAX_LIST_BYTES = 1024 ** 3
MAX_LINE_CHARS = 8192


@dataclasses.dataclass(frozen=True)
class UrlChunk:
    records: tuple[InputRecord, ...]


def hash_split(url: str, seed: int, validation_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}\0{url}".encode("utf-8")).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2 ** 64 < validation_fraction \
        else "train"


class UrlSource(Source):
    name = "urls"

    def __init__(self, list_file: str, downloader: Downloader, seed: int = 0,
                 validation_fraction: float = 0.2, synsets_file: Optional[str] = None,
                 synset_words_file: Optional[str] = None):
        self.path = Path(list_file).resolve()
        self.downloader = downloader
        self.seed, self.validation_fraction = seed, validation_fraction
        self.options = {"synsets_file": synsets_file, "synset_words_file": synset_words_file}
        if not self.path.is_file():
            raise ValueError(f"--input: {list_file}: no such file")
        if self.path.stat().st_size > MAX_LIST_BYTES:
            raise ValueError(f"--input: {list_file}: larger than {MAX_LIST_BYTES} bytes")
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"--input: {list_file}: not UTF-8 text ({err})") from None
        parsed = [(n, line, self._parse(line)) for n, line in enumerate(lines, 1)
                  if line.strip() and not line.lstrip().startswith("#")]
        if synsets_file:
            synsets = layout.read_synsets(synsets_file)
        else:
            synsets = sorted({p[0] for _, _, p in parsed if isinstance(p, tuple)})
            if not synsets:
                raise ValueError(f"--input: {list_file}: no valid '<label>\\t<url>' lines")
        self._classes = layout.make_classes(synsets, synset_words_file)
        self._records = self._build(parsed, {c.synset: c.index for c in self._classes})

    def _parse(self, line: str):
        """(label, url, split or None), or an error string."""
        if len(line) > MAX_LINE_CHARS:
            return f"line longer than {MAX_LINE_CHARS} characters"
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) not in (2, 3) or not fields[0] or not fields[1]:
            return "expected '<synset or label>\\t<url>[\\ttrain|validation]'"
        if not layout.valid_synset(fields[0]) or len(fields[0].split()) != 1:
            return f"invalid label {fields[0]!r}"
        split = fields[2] if len(fields) == 3 else None
        if split is not None and split not in SPLITS:
            return f"third column {split!r} is not train or validation"
        return fields[0], fields[1], split

    def _build(self, parsed, label_of) -> tuple[InputRecord, ...]:
        records, first_line = [], {}
        for lineno, line, p in parsed:
            where = f"{self.path}:{lineno}"
            if isinstance(p, str):
                split = hash_split(line, self.seed, self.validation_fraction)
                records.append(InputRecord(f"{split}/_line/{lineno:08d}", split, -1, where, None,
                                           ("error", f"line {lineno}: {p}")))
                continue
            synset, url, split = p
            split = split or hash_split(url, self.seed, self.validation_fraction)
            digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:20]
            reject = None
            scheme = urllib.parse.urlsplit(url).scheme.lower()
            if url in first_line:
                reject = ("error", f"line {lineno}: duplicate of line {first_line[url]}")
            elif scheme not in ("http", "https"):
                reject = ("download_error", f"line {lineno}: scheme {scheme!r} not allowed "
                                            "(http/https only)")
            elif synset not in label_of:
                reject = ("no_label", f"line {lineno}: {synset!r} is not in the class list")
            first_line.setdefault(url, lineno)
            key = f"{split}/{synset}/{digest}" if reject is None else f"{split}/_line/{lineno:08d}"
            records.append(InputRecord(key, split, label_of[synset] if reject is None else -1,
                                       url if reject is None else f"{where}: {url}", url, reject))
        return tuple(records)

    def __getstate__(self):
        # Executors get their records inside the units; do not ship the whole list with every task.
        state = dict(self.__dict__)
        state["_records"] = None
        return state

    # -- driver side -----------------------------------------------------------------------
    def classes(self) -> list[ClassInfo]:
        return list(self._classes)

    def describe(self) -> dict[str, Any]:
        d = self.downloader
        return {"kind": self.name, "input": str(self.path), "seed": self.seed,
                "validation_fraction": self.validation_fraction, "timeout": d.timeout,
                "retries": d.retries, "max_redirects": d.max_redirects,
                "max_bytes": d.max_bytes, "allow_private_addresses": d.allow_private,
                **self.options}

    def units(self) -> list[Any]:
        return [UrlChunk(self._records[i:i + CHUNK]) for i in range(0, len(self._records), CHUNK)]

    # -- executor side ---------------------------------------------------------------------
    def records(self, unit: Any) -> Iterator[InputRecord]:
        yield from unit.records

    @contextlib.contextmanager
    def open_unit(self, unit: Any) -> Iterator[Loader]:
        yield lambda record: self.downloader.fetch(record.locator)
