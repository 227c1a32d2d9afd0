"""Manifest loading and `etl verify` on a real dataset directory (real JPEGs, real local Spark).

Every corruption case must make verify fail AND name the damaged shard file.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import etl.verify
from common.atomic import write_json
from common.paths import DatasetPaths
from etl.manifest import DatasetError, load_manifest, manifest_sha256, shard_entries, validate_manifest
from etl.shard_writer import write_shard
from etl.verify import MAX_PROBLEMS_PER_SHARD, add_arguments, run, verify_dataset, verify_shard
from tests.etl.test_shard_writer import NAMES, SYNSETS, make_rows

QUARANTINE = [("train", "truncated"), ("train", "empty"), ("validation", "not_an_image")]


def build_dataset(root: Path, rows_by_split=None, shards=None) -> dict:
    """A complete dataset directory as the ETL job leaves it; returns its manifest."""
    ds = DatasetPaths(root)
    rows_by_split = rows_by_split or {"train": make_rows(7, "train"),
                                      "validation": make_rows(3, "validation")}
    shards = shards or {"train": 2, "validation": 1}
    splits = {}
    for split, rows in rows_by_split.items():
        count = shards[split]
        entries = []
        for i in range(count):
            entries += write_shard(rows[i::count], ds, split, i, count, ("tfrecord", "parquet"))
        reasons: dict[str, int] = {}
        for s, reason in QUARANTINE:
            if s == split:
                reasons[reason] = reasons.get(reason, 0) + 1
        splits[split] = {"inputs": len(rows) + sum(reasons.values()), "records": len(rows),
                         "quarantined": sum(reasons.values()), "quarantine_by_reason": reasons,
                         "shards": entries}
    with open(ds.quarantine, "w") as fh:
        for i, (split, reason) in enumerate(QUARANTINE):
            fh.write(json.dumps({"source": f"/in/{i}.JPEG", "split": split, "reason": reason,
                                 "detail": "test", "key": f"q{i}"}) + "\n")
    manifest = {
        "schema_version": 1, "created_utc": "2026-11-22T00:00:00Z", "settings_hash": "abcd1234",
        "settings": {"source": "test"}, "source": {"kind": "test"}, "resize": "fixed:64",
        "jpeg_quality": 90, "formats": ["tfrecord", "parquet"], "tfrecord_label_offset": 1,
        "classes": [{"index": i, "synset": s, "name": n}
                    for i, (s, n) in enumerate(zip(SYNSETS, NAMES))],
        "splits": splits,
    }
    write_json(ds.manifest, manifest)
    ds.success.write_bytes(b"")
    return manifest


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "ds"
    return root, build_dataset(root)


def _flip(path: Path, at: int, bit: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= bit
    path.write_bytes(bytes(data))


def _problems_about(report, file: str) -> list[str]:
    return [p for p in report.problems if p.startswith(file + ":")]


# ------------------------------------------------------------------------------- manifest

def test_load_manifest_accepts_a_complete_dataset(dataset):
    root, manifest = dataset
    assert load_manifest(root) == manifest
    entries = shard_entries(manifest, "train", "parquet")
    assert [e["file"] for e in entries] == ["train/part-00000-of-00002.parquet",
                                            "train/part-00001-of-00002.parquet"]
    assert sum(e["records"] for e in entries) == 7
    assert len(manifest_sha256(root)) == 64
    with pytest.raises(DatasetError, match="no split 'test'"):
        shard_entries(manifest, "test", "parquet")


def test_load_manifest_refuses_unfinished_or_broken_directories(dataset):
    root, manifest = dataset
    DatasetPaths(root).success.unlink()
    with pytest.raises(DatasetError, match=r"ds/_SUCCESS: missing"):
        load_manifest(root)
    assert load_manifest(root, require_success=False) == manifest
    DatasetPaths(root).manifest.write_text("{ not json")
    with pytest.raises(DatasetError, match=r"ds/manifest.json: not valid JSON"):
        load_manifest(root, require_success=False)
    DatasetPaths(root).manifest.unlink()
    with pytest.raises(DatasetError, match=r"ds/manifest.json: missing manifest"):
        load_manifest(root, require_success=False)
    with pytest.raises(DatasetError, match="does not exist"):
        load_manifest(root / "nowhere")


def _mutated(manifest: dict, change) -> dict:
    m = copy.deepcopy(manifest)
    change(m)
    return m


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(schema_version=2), "schema_version 2 is not supported"),
    (lambda m: m.update(schema_version=True), r"manifest.schema_version: expected int, got bool"),
    (lambda m: m.pop("classes"), "missing field 'classes'"),
    (lambda m: m["splits"]["train"].update(inputs=99), r"splits.train: inputs 99 != records 7"),
    (lambda m: m["splits"]["train"]["quarantine_by_reason"].update(empty=5),
     r"quarantine_by_reason: sums to 6, quarantined is 2"),
    (lambda m: m["splits"]["train"]["quarantine_by_reason"].update(gremlins=0),
     "unknown reason 'gremlins'"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../../etc/passwd"),
     "is not a relative path inside the dataset"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/passwd"),
     "is not a relative path inside the dataset"),
    (lambda m: m["splits"]["train"]["shards"][0].update(records=3),
     r"splits.train: tfrecord shards hold 6 records, the split says 7"),
    (lambda m: m["splits"]["train"]["shards"][0].update(sha256="xyz"), "is not 64 hex digits"),
    (lambda m: m["classes"][1].update(index=5), r"classes\[1\].index: 5"),
    (lambda m: m["classes"][2].update(synset=SYNSETS[0]), "is empty or repeated"),
    (lambda m: m.update(formats=["tfrecord", "csv"]), "formats: expected distinct values"),
    (lambda m: m["splits"]["validation"].update(
        shards=[e for e in m["splits"]["validation"]["shards"] if e["format"] != "parquet"]),
     "splits.validation: no parquet shards"),
])
def test_validate_manifest_names_the_problem(dataset, change, message):
    root, manifest = dataset
    validate_manifest(manifest, root)  # the unchanged manifest is valid
    with pytest.raises(DatasetError, match=message) as err:
        validate_manifest(_mutated(manifest, change), root)
    assert "manifest.json" in str(err.value)


# ------------------------------------------------------------------------------- verify

def test_verify_passes_on_a_sound_dataset(dataset, spark, capsys):
    root, manifest = dataset
    report = verify_dataset(root, spark=spark)
    assert report.ok, report.format()
    assert report.shards_checked == 6
    assert report.records_checked == 2 * (7 + 3)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(root)])) == 0  # joins the running session
    assert "OK" in capsys.readouterr().out
    assert str(report) == report.format() and str(report).startswith(f"dataset {root}: OK (6 ")


def test_empty_train_split_fails_verify(tmp_path, spark, capsys):
    """Every other check holds for a split whose inputs were all quarantined: only this one fails."""
    root = tmp_path / "ds"
    build_dataset(root, rows_by_split={"train": [], "validation": make_rows(3, "validation")},
                  shards={"train": 1, "validation": 1})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(root)])) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"dataset {root}: FAILED")
    problems = [line for line in out.splitlines() if line.startswith("  problem: ")]
    assert problems == ["  problem: manifest.json: split train is empty: none of its 2 input(s) "
                        "was written"], out


def test_verify_shard_works_without_spark(dataset):
    root, manifest = dataset
    for entry in manifest["splits"]["train"]["shards"]:
        assert verify_shard(root, entry, manifest) == []


def test_flipped_bit_in_tfrecord_payload(dataset, spark, capsys):
    root, manifest = dataset
    file = "train/part-00001-of-00002.tfrecord"
    _flip(root / file, 500)  # inside the first record's JPEG payload
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(root)])) == 1  # what `bigticket etl verify` returns
    out = capsys.readouterr().out
    problems = [line.removeprefix("  problem: ") for line in out.splitlines()
                if line.startswith("  problem: ")]
    assert out.startswith(f"dataset {root}: FAILED")
    assert f"{file}: record 0 at byte offset 0: data CRC mismatch" in problems, out
    assert any(p.startswith(f"{file}: sha256") for p in problems)
    assert all(p.startswith(file) for p in problems)  # the other shards are sound


def test_truncated_tfrecord_tail(dataset, spark):
    root, manifest = dataset
    file = "validation/part-00000-of-00001.tfrecord"
    path = root / file
    path.write_bytes(path.read_bytes()[:-7])
    report = verify_dataset(root, spark=spark)
    named = _problems_about(report, file)
    assert not report.ok
    assert any("truncated record" in p for p in named), report.format()
    assert any("the manifest says" in p and "bytes" in p for p in named)
    assert any("holds 2 readable records, the manifest says 3" in p for p in named)


def test_flipped_bit_in_parquet(dataset, spark):
    root, manifest = dataset
    file = "train/part-00000-of-00002.parquet"
    path = root / file
    rows = make_rows(7, "train")
    data = path.read_bytes()
    _flip(path, data.index(rows[2].jpeg[200:240]) + 5)  # inside a stored JPEG
    report = verify_dataset(root, spark=spark)
    named = _problems_about(report, file)
    assert not report.ok
    assert any("sha256" in p for p in named), report.format()
    assert any("unreadable" in p for p in named)  # the page CRC catches it on its own
    assert all(p.startswith(file) for p in report.problems)


def test_damaged_parquet_footer_and_tail(dataset, spark):
    root, manifest = dataset
    file = "validation/part-00000-of-00001.parquet"
    path = root / file
    data = path.read_bytes()
    path.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])  # a bit of the footer
    problems = _shard_problems(root, file)
    assert any("sha256" in p for p in problems), problems
    assert any("unreadable Parquet footer" in p for p in problems)
    path.write_bytes(data[:-20])  # a truncated tail
    report = verify_dataset(root, spark=spark)
    named = _problems_about(report, file)
    assert any("sha256" in p for p in named), report.format()
    assert any("unreadable Parquet footer" in p for p in named)
    assert all(p.startswith(file) for p in report.problems)


@pytest.mark.parametrize("fmt", ["tfrecord", "parquet"])
def test_any_flipped_bit_is_reported_without_crashing(dataset, fmt):
    root, manifest = dataset
    entry = next(e for e in manifest["splits"]["validation"]["shards"] if e["format"] == fmt)
    path = root / entry["file"]
    original = path.read_bytes()
    for at in range(0, len(original), max(1, len(original) // 40)):
        path.write_bytes(original[:at] + bytes([original[at] ^ 0x01]) + original[at + 1:])
        problems = verify_shard(root, entry, manifest)
        assert problems and all(p.startswith(entry["file"] + ": ") for p in problems)
        if fmt == "tfrecord":  # every TFRecord byte is covered by a CRC, not only by the sha256
            assert any("CRC mismatch" in p for p in problems), (at, problems)
    path.write_bytes(original)
    assert verify_shard(root, entry, manifest) == []


def test_wrong_record_counts_in_manifest(dataset, spark):
    root, manifest = dataset
    m = copy.deepcopy(manifest)
    # train: counts moved between two shards, so the split still adds up and only reading the
    # shards can expose it; validation: a parquet count that also breaks the split's sum.
    for entry in m["splits"]["train"]["shards"]:
        if entry["file"] == "train/part-00000-of-00002.tfrecord":
            entry["records"] += 1
        if entry["file"] == "train/part-00001-of-00002.tfrecord":
            entry["records"] -= 1
    [val_parquet] = [e for e in m["splits"]["validation"]["shards"] if e["format"] == "parquet"]
    val_parquet["records"] = 4
    write_json(DatasetPaths(root).manifest, m)
    report = verify_dataset(root, spark=spark)
    assert not report.ok
    assert _problems_about(report, "train/part-00000-of-00002.tfrecord") == [
        "train/part-00000-of-00002.tfrecord: holds 4 readable records, the manifest says 5"]
    assert _problems_about(report, "train/part-00001-of-00002.tfrecord") == [
        "train/part-00001-of-00002.tfrecord: holds 3 readable records, the manifest says 2"]
    file = "validation/part-00000-of-00001.parquet"
    assert _problems_about(report, file) == [
        f"{file}: footer says 3 rows, the manifest 4",
        f"{file}: holds 3 readable records, the manifest says 4"]
    assert ("manifest.json: splits.validation: parquet shards hold 4 records, the split says 3"
            in report.problems)
    assert len(report.problems) == 5


def _dataset_with(tmp_path, bad_rows: dict[int, dict]) -> Path:
    """A dataset whose train rows (6, in 2 shards: row i goes to shard i % 2) are altered."""
    rows = make_rows(6, "train")
    for i, changes in bad_rows.items():
        rows[i] = dataclasses.replace(rows[i], **changes)
    root = tmp_path / "bad"
    build_dataset(root, {"train": rows, "validation": make_rows(2, "validation")},
                  {"train": 2, "validation": 1})
    return root


def test_label_out_of_range_and_image_of_another_size(tmp_path, spark):
    # Row 3 (shard 1, its row 1) gets a label past the 3 classes; row 4 (shard 0, its row 2)
    # records a height of 20 for a JPEG that is 16 high.
    root = _dataset_with(tmp_path, {3: dict(label=3, synset="n09999999"), 4: dict(height=20)})
    report = verify_dataset(root, spark=spark)
    assert not report.ok
    assert _problems_about(report, "train/part-00001-of-00002.tfrecord") == [
        "train/part-00001-of-00002.tfrecord: record 1 (image/class/label 4, offset 1): "
        "label 3 is not in [0, 3)"]
    assert _problems_about(report, "train/part-00001-of-00002.parquet") == [
        "train/part-00001-of-00002.parquet: row 1: label 3 is not in [0, 3)"]
    for fmt, what in (("tfrecord", "record"), ("parquet", "row")):
        assert _problems_about(report, f"train/part-00000-of-00002.{fmt}") == [
            f"train/part-00000-of-00002.{fmt}: {what} 2: image is 16x24 (HxW), recorded 20x24"]
    assert len(report.problems) == 4


def _shard_problems(root: Path, file: str) -> list[str]:
    """verify_shard (no Spark) on one shard of the dataset at root."""
    manifest = load_manifest(root)
    [entry] = [e for info in manifest["splits"].values() for e in info["shards"]
               if e["file"] == file]
    return verify_shard(root, entry, manifest)


def test_synset_that_does_not_match_the_label(tmp_path):
    root = _dataset_with(tmp_path, {2: dict(synset=SYNSETS[1])})  # label 2 is SYNSETS[2]
    for fmt in ("tfrecord", "parquet"):
        problems = _shard_problems(root, f"train/part-00000-of-00002.{fmt}")
        assert len(problems) == 1 and f"synset '{SYNSETS[1]}' but label 2" in problems[0]


def test_grayscale_or_broken_jpeg(tmp_path):
    gray = io.BytesIO()
    Image.new("L", (24, 16), 128).save(gray, format="JPEG")
    rows = make_rows(4, "train")
    rows[0] = dataclasses.replace(rows[0], jpeg=gray.getvalue())
    rows[1] = dataclasses.replace(rows[1], jpeg=rows[1].jpeg[: len(rows[1].jpeg) // 2])
    root = tmp_path / "gray"
    build_dataset(root, {"train": rows, "validation": make_rows(1, "validation")},
                  {"train": 1, "validation": 1})
    for fmt, what in (("parquet", "row"), ("tfrecord", "record")):
        named = _shard_problems(root, f"train/part-00000-of-00001.{fmt}")
        assert any(f"{what} 0: image mode L, not 3-channel RGB" in p for p in named), named
        assert any(f"{what} 1: image does not decode" in p for p in named)


def test_dataset_level_checks(dataset, spark, monkeypatch):
    root, manifest = dataset
    ds = DatasetPaths(root)
    ds.success.unlink()
    monkeypatch.setattr(etl.verify, "MAX_QUARANTINE_LINE", 300)
    with open(ds.quarantine, "a") as fh:
        fh.write(json.dumps({"source": "x", "split": "train", "reason": "empty",
                             "detail": ""}) + "\n")
        fh.write("not json\n")
        fh.write(json.dumps({"source": "y" * 900, "split": "validation", "reason": "empty",
                             "detail": ""}) + "\n")
    (ds.split_dir("train") / "part-00009-of-00010.tfrecord").write_bytes(b"stray")
    (ds.split_dir("train") / ".part-00000-of-00002.tfrecord.abc.tmp").write_bytes(b"partial")
    report = verify_dataset(root, spark=spark)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "_SUCCESS: missing" in text
    assert "quarantine.jsonl: 3 line(s) for split 'train', the manifest says quarantined 2" in text
    assert "quarantine.jsonl:5: not a quarantine entry" in text
    assert "quarantine.jsonl:6: line longer than 300" in text
    assert "split 'validation'" not in text  # the oversized line was skipped, not counted
    assert "train/part-00009-of-00010.tfrecord: shard file not listed in the manifest" in text
    assert report.warnings == ["train/.part-00000-of-00002.tfrecord.abc.tmp: temporary file of "
                               "an unfinished write"]
    assert report.shards_checked == 6  # shards are still checked and are sound


def test_missing_shard_and_unsafe_manifest(dataset, spark):
    root, manifest = dataset
    (root / "validation/part-00000-of-00001.tfrecord").unlink()
    report = verify_dataset(root, spark=spark)
    assert report.problems == ["validation/part-00000-of-00001.tfrecord: missing"]
    m = copy.deepcopy(manifest)
    m["splits"]["train"]["shards"][0]["file"] = "../outside.tfrecord"
    write_json(DatasetPaths(root).manifest, m)
    report = verify_dataset(root, spark=spark)
    assert report.shards_checked == 0  # nothing is opened through an unsafe manifest
    assert any("'../outside.tfrecord' is not a relative path inside" in p
               for p in report.problems)


def test_problem_list_is_capped_but_keeps_shard_level_findings(tmp_path):
    rows = [dataclasses.replace(r, label=7) for r in make_rows(14, "train")]
    root = tmp_path / "many"
    build_dataset(root, {"train": rows, "validation": make_rows(1, "validation")},
                  {"train": 1, "validation": 1})
    file = "train/part-00000-of-00001.tfrecord"
    path = root / file
    path.write_bytes(path.read_bytes()[:-1])  # and a truncated tail after 13 good records
    problems = _shard_problems(root, file)
    assert len([p for p in problems if "label 7 is not in [0, 3)" in p]) == MAX_PROBLEMS_PER_SHARD
    assert f"{file}: ... and 4 more problem(s)" in problems  # 3 labels + the truncation
    assert any("sha256" in p for p in problems)
    assert f"{file}: holds 13 readable records, the manifest says 14" in problems
