"""write_shard / clean_stale_temps on real JPEG rows made from scikit-learn's sample photos."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from common.paths import DatasetPaths
from etl.parquet_io import iter_parquet
from etl.records import ImageRow
from etl.shard_writer import clean_stale_temps, is_shard_temp, write_shard
from etl.tfrecord import decode_example, iter_records

SYNSETS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]


def sample_photo_paths() -> list[Path]:
    """The two real photographs that scikit-learn ships (read without importing sklearn)."""
    spec = importlib.util.find_spec("sklearn")
    base = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    return [base / "china.jpg", base / "flower.jpg"]


def make_rows(n: int, split: str = "train", size: tuple[int, int] = (24, 16)) -> list[ImageRow]:
    """n ImageRows of real JPEG crops of the sample photos; width, height = size."""
    photos = [Image.open(p).convert("RGB") for p in sample_photo_paths()]
    rows = []
    for i in range(n):
        photo = photos[i % len(photos)]
        box = (i * 13 % 300, i * 7 % 200)
        crop = photo.crop((box[0], box[1], box[0] + 96, box[1] + 64)).resize(size)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        label = i % len(SYNSETS)
        rows.append(ImageRow(key=f"{split}-{i:04d}", split=split, label=label,
                             synset=SYNSETS[label], class_text=NAMES[label],
                             filename=f"img_{i:04d}.JPEG", jpeg=buf.getvalue(),
                             height=size[1], width=size[0]))
    return rows


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writes_both_formats_from_one_pass(tmp_path):
    ds = DatasetPaths(tmp_path / "ds")
    rows = make_rows(7)
    consumed = []

    def once():  # a generator can only be consumed once: proves a single pass
        for r in rows:
            consumed.append(r.key)
            yield r

    entries = write_shard(once(), ds, "train", 1, 4, ("tfrecord", "parquet"))
    assert consumed == [r.key for r in rows]
    assert [e["format"] for e in entries] == ["tfrecord", "parquet"]
    for e in entries:
        path = ds.root / e["file"]
        assert path == ds.shard("train", 1, 4, e["format"])
        assert e["file"] == f"train/part-00001-of-00004.{e['format']}"
        assert e["index"] == 1 and e["records"] == 7
        assert e["bytes"] == path.stat().st_size
        assert e["sha256"] == _sha(path)
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    examples = [decode_example(r) for r in iter_records(ds.shard("train", 1, 4, "tfrecord"))]
    assert [ex["image/class/label"] for ex in examples] == [[r.label + 1] for r in rows]
    assert [ex["image/encoded"][0] for ex in examples] == [r.jpeg for r in rows]
    table = list(iter_parquet(ds.shard("train", 1, 4, "parquet")))
    assert [t["label"] for t in table] == [r.label for r in rows]
    assert [t["key"] for t in table] == [r.key for r in rows]
    assert sorted(p.name for p in ds.split_dir("train").iterdir()) == [
        "part-00001-of-00004.parquet", "part-00001-of-00004.tfrecord"]


def test_label_offset_and_single_format(tmp_path):
    ds = DatasetPaths(tmp_path)
    rows = make_rows(3, split="validation")
    [entry] = write_shard(iter(rows), ds, "validation", 0, 1, ("tfrecord",), label_offset=0)
    labels = [decode_example(r)["image/class/label"][0]
              for r in iter_records(ds.root / entry["file"])]
    assert labels == [r.label for r in rows]
    assert not ds.shard("validation", 0, 1, "parquet").exists()


def test_empty_shard_is_valid(tmp_path):
    ds = DatasetPaths(tmp_path)
    entries = write_shard([], ds, "train", 0, 2, ("tfrecord", "parquet"))
    assert [e["records"] for e in entries] == [0, 0]
    assert list(iter_records(ds.shard("train", 0, 2, "tfrecord"))) == []
    assert list(iter_parquet(ds.shard("train", 0, 2, "parquet"))) == []


def test_retried_attempts_write_identical_content(tmp_path):
    ds = DatasetPaths(tmp_path)
    rows = make_rows(5)
    first = write_shard(rows, ds, "train", 0, 1, ("tfrecord", "parquet"))
    second = write_shard(rows, ds, "train", 0, 1, ("tfrecord", "parquet"))
    assert first == second
    # Two concurrent (speculative) attempts: both complete, the final files are whole and equal.
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        write_shard(rows, ds, "train", 0, 1, ("tfrecord", "parquet")))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [first, first]
    assert _sha(ds.shard("train", 0, 1, "tfrecord")) == first[0]["sha256"]
    assert _sha(ds.shard("train", 0, 1, "parquet")) == first[1]["sha256"]
    assert not any(is_shard_temp(p.name) for p in ds.split_dir("train").iterdir())


def test_failure_mid_stream_leaves_no_file(tmp_path):
    ds = DatasetPaths(tmp_path)
    rows = make_rows(4)

    def failing():
        yield from rows[:2]
        raise RuntimeError("decoder died")

    with pytest.raises(RuntimeError, match="decoder died"):
        write_shard(failing(), ds, "train", 0, 1, ("tfrecord", "parquet"))
    assert list(ds.split_dir("train").iterdir()) == []


def test_previous_complete_shard_survives_a_failed_retry(tmp_path):
    ds = DatasetPaths(tmp_path)
    rows = make_rows(3)
    [entry] = write_shard(rows, ds, "train", 0, 1, ("parquet",))

    def failing():
        yield rows[0]
        raise OSError("disk vanished")

    with pytest.raises(OSError):
        write_shard(failing(), ds, "train", 0, 1, ("parquet",))
    assert _sha(ds.root / entry["file"]) == entry["sha256"]


def test_rejects_bad_arguments(tmp_path):
    ds = DatasetPaths(tmp_path)
    rows = make_rows(1)
    with pytest.raises(ValueError, match="formats"):
        write_shard(rows, ds, "train", 0, 1, ("csv",))
    with pytest.raises(ValueError, match="shard index 3"):
        write_shard(rows, ds, "train", 3, 2, ("tfrecord",))
    with pytest.raises(ValueError, match="split 'train', not to the shard's split 'validation'"):
        write_shard(rows, ds, "validation", 0, 1, ("tfrecord",))
    assert not any(ds.split_dir("validation").iterdir())


def test_clean_stale_temps_removes_only_temporaries(tmp_path):
    ds = DatasetPaths(tmp_path)
    [entry] = write_shard(make_rows(2), ds, "train", 0, 3, ("tfrecord",))
    split_dir = ds.split_dir("train")
    stale = [split_dir / ".part-00001-of-00003.tfrecord.k1ll3d.tmp",
             split_dir / ".part-00002-of-00003.parquet.abc.tmp"]
    keep = [split_dir / "notes.tmp", split_dir / ".hidden"]
    for p in stale + keep:
        p.write_bytes(b"partial")
    assert all(not is_shard_temp(p.name) for p in keep)
    assert not is_shard_temp(Path(entry["file"]).name)
    assert clean_stale_temps(ds, "train") == 2
    assert sorted(os.listdir(split_dir)) == sorted(
        [".hidden", "notes.tmp", "part-00000-of-00003.tfrecord"])
    assert clean_stale_temps(ds, "validation") == 0  # no such split directory yet
