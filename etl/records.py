"""The records that flow through the ETL job, shared by sources, image processing and writers.

Every input the sources enumerate becomes exactly one InputRecord; every InputRecord ends as
exactly one written row or one quarantine entry. That one-to-one flow is what lets the manifest
reconcile inputs = written + quarantined per split.
"""
from __future__ import annotations

import dataclasses
from typing import Any

SPLITS = ("train", "validation")

# Quarantine reasons (the `reason` field of quarantine.jsonl). Sources and image processing use
# these names; the manifest counts by them.
REASONS = (
    "empty",               # zero bytes
    "truncated",           # image data ends early
    "not_an_image",        # no image format recognised
    "decompression_bomb",  # header claims more pixels than the limit
    "too_large",           # more bytes than the per-image cap
    "decode_error",        # recognised format that fails to decode
    "unsafe_member",       # archive member with a link, device, absolute path or '..'
    "unexpected_name",     # archive or folder entry whose name does not fit the layout
    "no_label",            # no class could be assigned (e.g. missing ground-truth line)
    "download_error",      # URL fetch failed (HTTP status, timeout, refused address, ...)
    "error",               # anything else; the detail says what
)


class Rejected(Exception):
    """An input that cannot become a training image; carries the quarantine reason."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    index: int   # label from 0
    synset: str  # e.g. n01440764, or the folder name
    name: str    # human-readable text (image/class/text); the synset when unknown


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """One input image as a source enumerates it, before any pixel is read.

    `locator` is source-specific, small and picklable (a path, an archive offset, a batch index,
    a URL). A record the source already knows to be bad carries `reject` = (reason, detail) and
    goes straight to quarantine.
    """

    key: str          # unique within the dataset, stable across runs (used for sharding)
    split: str        # "train" or "validation"
    label: int        # from 0; -1 when unknown (then `reject` is set)
    source: str       # human-readable origin for quarantine lines (path, path!member, URL)
    locator: Any = None
    reject: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class ImageRow:
    """A processed image ready for the shard writers."""

    key: str
    split: str
    label: int        # from 0 (TFRecord stores label + offset)
    synset: str
    class_text: str
    filename: str     # image/filename: the base name of the original input
    jpeg: bytes       # 3-channel RGB baseline JPEG
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class QuarantineEntry:
    key: str
    split: str
    source: str
    reason: str
    detail: str

    def to_json(self) -> dict:
        return {"source": self.source, "split": self.split, "reason": self.reason,
                "detail": self.detail, "key": self.key}
