"""imagenet-folder over real small trees of real image files."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from etl.records import REASONS, Rejected
from etl.sources.folder import FolderSource


def image_bytes(seed: int, fmt: str = "JPEG", size=(12, 9)) -> bytes:
    """A small real image whose pixels depend on `seed` (so every file's bytes differ)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def drain(source):
    """key -> (record, payload or the Rejected raised by the loader), as the Spark job reads it:
    units and the source go through pickle, and every unit is enumerated twice identically."""
    out = {}
    for unit in source.units():
        unit = pickle.loads(pickle.dumps(unit))
        remote = pickle.loads(pickle.dumps(source))
        first = list(remote.records(unit))
        assert first == list(remote.records(unit)), "enumeration must be deterministic"
        with remote.open_unit(unit) as load:
            for record in first:
                assert record.key not in out, f"duplicate key {record.key}"
                assert record.split in ("train", "validation")
                if record.reject:
                    assert record.reject[0] in REASONS and record.label == -1
                    out[record.key] = (record, None)
                    continue
                try:
                    out[record.key] = (record, load(record))
                except Rejected as err:
                    out[record.key] = (record, err)
    return out


def build_imagenet_tree(root: Path) -> dict[str, bytes]:
    """A tiny ImageNet layout with flat validation; returns relpath -> bytes of the good files."""
    files = {
        "train/n01/n01_1.JPEG": image_bytes(1),
        "train/n01/n01_2.jpg": image_bytes(2),
        "train/n01/n01_3.PNG": image_bytes(3, "PNG"),
        "train/n02/n02_1.JPEG": image_bytes(4),
        "train/n03/n03_1.jpeg": image_bytes(5),
        "val/ILSVRC2012_val_00000001.JPEG": image_bytes(6),
        "val/ILSVRC2012_val_00000002.JPEG": image_bytes(7),
        "val/ILSVRC2012_val_00000003.JPEG": image_bytes(8),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "gt.txt").write_text("n02\n1\nn03\n")  # synsets and 1-based indices both accepted
    return files


def write_bad_entries(root: Path) -> None:
    (root / "train/n01/.hidden.JPEG").write_bytes(image_bytes(9))
    (root / "train/n01/notes.txt").write_text("not an image")
    (root / "train/n01/nested").mkdir()
    (root / "train/stray.JPEG").write_bytes(image_bytes(10))
    (root / "val/ILSVRC2012_val_00000009.JPEG").write_bytes(image_bytes(11))  # no gt line 9
    (root / "val/holiday.JPEG").write_bytes(image_bytes(12))


def test_flat_validation_labels_keys_and_bytes(tmp_path):
    files = build_imagenet_tree(tmp_path)
    source = FolderSource(str(tmp_path), val_ground_truth_file=str(tmp_path / "gt.txt"))
    assert [(c.index, c.synset, c.name) for c in source.classes()] == \
        [(0, "n01", "n01"), (1, "n02", "n02"), (2, "n03", "n03")]
    got = drain(source)
    assert {k: (r.split, r.label) for k, (r, _) in got.items()} == {
        "train/n01/n01_1.JPEG": ("train", 0), "train/n01/n01_2.jpg": ("train", 0),
        "train/n01/n01_3.PNG": ("train", 0), "train/n02/n02_1.JPEG": ("train", 1),
        "train/n03/n03_1.jpeg": ("train", 2),
        "validation/n02/ILSVRC2012_val_00000001.JPEG": ("validation", 1),
        "validation/n01/ILSVRC2012_val_00000002.JPEG": ("validation", 0),
        "validation/n03/ILSVRC2012_val_00000003.JPEG": ("validation", 2),
    }
    by_source = {r.source: payload for r, payload in got.values()}
    for rel, data in files.items():
        assert by_source[str(tmp_path.resolve() / rel)] == data


def test_bad_entries_are_records_with_reasons(tmp_path):
    build_imagenet_tree(tmp_path)
    write_bad_entries(tmp_path)
    source = FolderSource(str(tmp_path), val_ground_truth_file=str(tmp_path / "gt.txt"))
    got = drain(source)
    rejects = {k: r.reject[0] for k, (r, _) in got.items() if r.reject}
    assert rejects == {
        "train/n01/.hidden.JPEG": "unexpected_name",
        "train/n01/notes.txt": "unexpected_name",
        "train/n01/nested": "unexpected_name",
        "train/_unexpected/stray.JPEG": "unexpected_name",
        "validation/_unlabelled/ILSVRC2012_val_00000009.JPEG": "no_label",
        "validation/_unlabelled/holiday.JPEG": "unexpected_name",
    }
    assert len(got) == 8 + 6  # every entry of the tree is exactly one record


def test_size_cap_rejects_without_reading(tmp_path):
    files = build_imagenet_tree(tmp_path)
    cap = sorted(len(b) for b in files.values())[3]
    source = FolderSource(str(tmp_path), val_ground_truth_file=str(tmp_path / "gt.txt"),
                          max_image_bytes=cap)
    got = drain(source)
    too_large = [r.key for r, p in got.values() if isinstance(p, Rejected)]
    assert all(got[k][1].reason == "too_large" for k in too_large)
    assert len(too_large) == sum(len(b) > cap for b in files.values()) > 0
    assert all(len(p) <= cap for r, p in got.values() if isinstance(p, bytes))


def test_validation_synset_folders_synsets_file_and_words(tmp_path):
    for rel, seed in [("train/b/1.JPEG", 1), ("train/a/2.JPEG", 2), ("train/zz/3.JPEG", 3),
                      ("validation/a/4.JPEG", 4), ("validation/b/5.JPEG", 5),
                      ("validation/c/6.JPEG", 6)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(image_bytes(seed))
    (tmp_path / "synsets.txt").write_text("b\na\n")
    (tmp_path / "words.txt").write_text("a\tapple, pome\nb bear\n")
    source = FolderSource(str(tmp_path), synsets_file=str(tmp_path / "synsets.txt"),
                          synset_words_file=str(tmp_path / "words.txt"))
    assert [(c.index, c.synset, c.name) for c in source.classes()] == \
        [(0, "b", "bear"), (1, "a", "apple, pome")]
    got = {k: (r.label, r.reject and r.reject[0]) for k, (r, _) in drain(source).items()}
    assert got == {"train/b/1.JPEG": (0, None), "train/a/2.JPEG": (1, None),
                   "train/zz/3.JPEG": (-1, "no_label"), "validation/a/4.JPEG": (1, None),
                   "validation/b/5.JPEG": (0, None), "validation/c/6.JPEG": (-1, "no_label")}


def test_symlinked_file_is_read_and_dangling_link_is_an_error_record(tmp_path):
    build_imagenet_tree(tmp_path)
    target = tmp_path / "elsewhere.JPEG"
    target.write_bytes(image_bytes(20))
    os.symlink(target, tmp_path / "train/n02/linked.JPEG")
    os.symlink(tmp_path / "missing.JPEG", tmp_path / "train/n02/dangling.JPEG")
    got = drain(FolderSource(str(tmp_path), val_ground_truth_file=str(tmp_path / "gt.txt")))
    assert got["train/n02/linked.JPEG"][1] == target.read_bytes()
    assert got["train/n02/dangling.JPEG"][0].reject[0] == "error"


@pytest.mark.parametrize("case, match", [
    ("no_train", r"train"),
    ("absent_synset", r"synsets_file: .*'n09'"),
    ("no_ground_truth", r"val_ground_truth_file"),
    ("missing_ground_truth_file", r"val_ground_truth_file: .*nope.txt"),
    ("bad_ground_truth_line", r"gt.txt:2: class index 7"),
    ("both_val_dirs", r"both validation/ and val/"),
])
def test_structural_errors_name_the_path_or_flag(tmp_path, case, match):
    build_imagenet_tree(tmp_path)
    kwargs = {"val_ground_truth_file": str(tmp_path / "gt.txt")}
    if case == "no_train":
        os.rename(tmp_path / "train", tmp_path / "training")
    elif case == "absent_synset":
        (tmp_path / "s.txt").write_text("n01\nn09\n")
        kwargs["synsets_file"] = str(tmp_path / "s.txt")
    elif case == "no_ground_truth":
        kwargs = {}
    elif case == "missing_ground_truth_file":
        kwargs["val_ground_truth_file"] = str(tmp_path / "nope.txt")
    elif case == "bad_ground_truth_line":
        (tmp_path / "gt.txt").write_text("n01\n7\n")
    elif case == "both_val_dirs":
        (tmp_path / "validation").mkdir()
    with pytest.raises(ValueError, match=match):
        FolderSource(str(tmp_path), **kwargs)
