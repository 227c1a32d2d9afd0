"""The ImageNet naming rules shared by the folder and tar sources.

Both sources must give the same images the same keys and labels, so class lists, synset words,
validation ground truth, accepted file names and the key format live here, once.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

from etl.records import ClassInfo

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.(?:jpeg|jpg|png)$", re.IGNORECASE)
# Text files the settings point at are small (1000 synsets, 50,000 ground-truth lines); refuse
# anything far bigger rather than read an arbitrary file into memory.
MAX_LIST_FILE_BYTES = 64 * 1024 * 1024


def image_key(split: str, synset: str, basename: str) -> str:
    """The key both ImageNet sources give an image: identical for the folder and the tar layout."""
    return f"{split}/{synset}/{basename}"


def name_problem(basename: str) -> Optional[str]:
    """Why a file name is not an acceptable image name, or None when it is."""
    if basename.startswith("."):
        return f"hidden file {basename!r}"
    if not basename.lower().endswith(IMAGE_EXTENSIONS):
        return f"{basename!r} has no image extension ({', '.join(IMAGE_EXTENSIONS)})"
    return None


def _read_lines(path: str, flag: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag}: {p}: no such file")
    if p.stat().st_size > MAX_LIST_FILE_BYTES:
        raise ValueError(f"{flag}: {p}: larger than {MAX_LIST_FILE_BYTES} bytes")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{flag}: {p}: not UTF-8 text ({err})") from None


def valid_synset(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") \
        and not name.startswith(".") and name.strip() == name


def read_synsets(path: str) -> list[str]:
    """One synset per line (blank lines ignored), in class order."""
    synsets: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(path, "synsets_file"), 1):
        name = line.strip()
        if not name:
            continue
        if not valid_synset(name) or len(name.split()) != 1:
            raise ValueError(f"synsets_file: {path}:{lineno}: invalid synset {name!r}")
        if name in seen:
            raise ValueError(f"synsets_file: {path}:{lineno}: {name!r} repeats line {seen[name]}")
        seen[name] = lineno
        synsets.append(name)
    if not synsets:
        raise ValueError(f"synsets_file: {path}: no synsets")
    return synsets


def read_synset_words(path: str) -> dict[str, str]:
    """`<synset><tab or space><words>` per line, as the devkit's synset_words.txt."""
    words: dict[str, str] = {}
    for lineno, line in enumerate(_read_lines(path, "synset_words_file"), 1):
        if not line.strip():
            continue
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"synset_words_file: {path}:{lineno}: expected '<synset> <words>'")
        words[parts[0]] = parts[1].strip()
    return words


def make_classes(synsets: list[str], words_file: Optional[str]) -> list[ClassInfo]:
    words = read_synset_words(words_file) if words_file else {}
    return [ClassInfo(i, s, words.get(s, s)) for i, s in enumerate(synsets)]


def read_ground_truth(path: Optional[str], synsets: list[str]) -> list[str]:
    """Synset of validation image i+1 for each line i.

    A line is a synset or a 1-based index into the class list. The devkit's
    ILSVRC2012_validation_ground_truth.txt numbers classes by its meta.mat ILSVRC2012_ID, so with
    indices the synsets_file must list synsets in that same order.
    """
    if not path:
        raise ValueError("val_ground_truth_file: required for a flat validation layout "
                         "(ILSVRC2012_val_%08d.JPEG files without synset folders)")
    known = set(synsets)
    out: list[str] = []
    for lineno, line in enumerate(_read_lines(path, "val_ground_truth_file"), 1):
        value = line.strip()
        if value.isdigit():
            index = int(value)
            if not 1 <= index <= len(synsets):
                raise ValueError(f"val_ground_truth_file: {path}:{lineno}: class index {index} "
                                 f"outside 1..{len(synsets)}")
            out.append(synsets[index - 1])
        elif value in known:
            out.append(value)
        else:
            raise ValueError(f"val_ground_truth_file: {path}:{lineno}: unknown synset {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class FlatVal:
    """Labels for a flat validation directory or tar (ILSVRC2012_val_%08d.JPEG)."""

    ground_truth: tuple[str, ...]
    label_of: dict

    @classmethod
    def build(cls, path: Optional[str], synsets: list[str]) -> "FlatVal":
        return cls(tuple(read_ground_truth(path, synsets)), {s: i for i, s in enumerate(synsets)})

    def classify(self, basename: str) -> tuple[str, int, Optional[tuple[str, str]]]:
        """(synset, label, reject) for a flat validation file name."""
        match = VAL_NAME.match(basename)
        if not match:
            return "_unlabelled", -1, ("unexpected_name",
                                       f"{basename!r} is not ILSVRC2012_val_%08d.<ext>")
        number = int(match.group(1))
        if not 1 <= number <= len(self.ground_truth):
            return "_unlabelled", -1, ("no_label", f"{basename!r}: no ground-truth line {number} "
                                       f"(file has {len(self.ground_truth)})")
        synset = self.ground_truth[number - 1]
        return synset, self.label_of[synset], None
