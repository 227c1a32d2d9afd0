"""The Spark ETL job end to end, with real Spark, real files and real task failures."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from common.paths import DatasetPaths
from etl.job import EtlError, dataset_hash, prepare
from etl.manifest import DatasetUnusable, OutputDirError, check_output_dir, load_manifest
from etl.settings import EtlSettings
from etl.verify import verify_dataset

REPO = Path(__file__).resolve().parents[2]


def _digits(out: Path, **overrides) -> EtlSettings:
    values = dict(source="digits", out=str(out), resize="fixed:16", format="both",
                  train_shards=3, validation_shards=2)
    values.update(overrides)
    return EtlSettings(**values)


def _stable(manifest: dict) -> dict:
    """A manifest without the fields that legitimately differ between two identical runs."""
    m = json.loads(json.dumps(manifest))
    m.pop("created_utc")
    m["settings"].pop("out")
    m["source"] = {k: v for k, v in m["source"].items() if "path" not in k and k != "input"}
    return m


def _final_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for split in ("train", "validation") if (root / split).exists()
            for p in sorted((root / split).iterdir())}


@pytest.fixture(scope="module")
def digits_clean(spark, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clean") / "digits"
    return out, prepare(_digits(out), spark=spark)


def test_digits_dataset_reconciles_and_verifies(digits_clean, spark):
    out, manifest = digits_clean
    splits = manifest["splits"]
    assert set(splits) == {"train", "validation"}
    assert sum(s["inputs"] for s in splits.values()) == 1797  # scikit-learn's digits
    for split in splits.values():
        assert split["inputs"] == split["records"] + split["quarantined"]
        tf_records = sum(e["records"] for e in split["shards"] if e["format"] == "tfrecord")
        pq_records = sum(e["records"] for e in split["shards"] if e["format"] == "parquet")
        assert tf_records == pq_records == split["records"]
    assert [c["index"] for c in manifest["classes"]] == list(range(10))
    assert (out / "_SUCCESS").exists() and not (out / "_staging").exists()
    assert load_manifest(out)["settings_hash"] == manifest["settings_hash"]
    report = verify_dataset(out, spark=spark)
    assert report.ok, report


def test_rerun_of_finished_job_does_nothing(digits_clean, spark):
    out, manifest = digits_clean
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = prepare(_digits(out), spark=spark)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_other_settings_in_same_directory_are_refused(digits_clean, spark):
    out, _ = digits_clean
    with pytest.raises(EtlError, match="different dataset"):
        prepare(_digits(out, quality=50), spark=spark)


def test_bad_inputs_are_all_accounted_for(spark, tmp_path):
    from tests.etl.corpus import write_bad_corpus

    cap = 200_000
    root = tmp_path / "imagenet"
    expected = write_bad_corpus(root / "train" / "n00000001", max_bytes=cap)
    # A second class of good photos, so labels are not all equal.
    good = [n for n, reason in expected.items() if reason is None]
    (root / "train" / "n00000002").mkdir(parents=True)
    for name in good:
        data = (root / "train" / "n00000001" / name).read_bytes()
        (root / "train" / "n00000002" / name.replace("n00000001", "n00000002")).write_bytes(data)
    out = tmp_path / "ds"
    manifest = prepare(EtlSettings(source="imagenet-folder", input=str(root), out=str(out),
                                   resize="center:48", train_shards=2, max_image_bytes=cap),
                       spark=spark)
    train = manifest["splits"]["train"]
    assert train["inputs"] == len(expected) + len(good)
    assert train["records"] == 2 * len(good)
    lines = [json.loads(l) for l in (out / "quarantine.jsonl").read_text().splitlines()]
    got = {Path(l["source"]).name: l["reason"] for l in lines}
    assert got == {n: r for n, r in expected.items() if r is not None}
    assert all(l["split"] == "train" and l["detail"] is not None for l in lines)
    assert train["quarantine_by_reason"] == {r: list(got.values()).count(r) for r in set(got.values())}
    # Everything written is a 3-channel JPEG of the policy's size, whatever the input mode was.
    from etl.parquet_io import iter_parquet

    for entry in (e for e in train["shards"] if e["format"] == "parquet"):
        for row in iter_parquet(out / entry["file"]):
            img = Image.open(io.BytesIO(row["image"]))
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (48, 48))
    assert verify_dataset(out, spark=spark).ok


def _run_cli(out: Path, master: str, faults: str | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), BIGTICKET_LOG_LEVEL="WARNING")
    if faults:
        env["BIGTICKET_TEST_FAULTS"] = faults
    cmd = [sys.executable, "-m", "bigticket", "etl", "prepare", "--source", "digits", "--out", str(out),
           "--resize", "fixed:16", "--format", "both", "--shards", "3", "--validation-shards", "2",
           "--master", master]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, **kw)


@pytest.mark.slow
def test_failed_and_dying_tasks_are_retried_exactly(digits_clean, tmp_path):
    """local[2,4] retries tasks; first attempts raise, or kill their Python worker, in every stage."""
    clean_out, clean_manifest = digits_clean
    out = tmp_path / "digits"
    proc = _run_cli(out, "local[2,4]",
                    faults="raise@enumerate:0;die@enumerate:1;raise@write:0;die@write:2;die@commit:3")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert _stable(load_manifest(out)) == _stable(clean_manifest)
    assert _final_files(out) == _final_files(clean_out)
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_killed_driver_resumes_to_the_clean_result(digits_clean, tmp_path):
    clean_out, clean_manifest = digits_clean
    clean_files = _final_files(clean_out)
    out = tmp_path / "digits"
    proc = _run_cli(out, "local[2]", faults="sleep@write:*=1.5")
    staging = DatasetPaths(out).staging
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(staging.glob("*/*.json")):
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its JVM and its Python workers
    proc.wait()
    assert not (out / "_SUCCESS").exists()
    # Whatever sits under a final shard name is complete: byte-identical to the clean run's shard.
    for name, data in _final_files(out).items():
        if not name.split("/")[-1].startswith("."):
            assert data == clean_files[name], name
    proc = _run_cli(out, "local[2]")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert _stable(load_manifest(out)) == _stable(clean_manifest)
    assert _final_files(out) == clean_files


# ------------------------------------------------- one enumeration, one shuffle, source mistakes

class _ListedSource:
    """A source whose units are lists of (split, key): the count pass's inputs, chosen exactly.

    Each records(unit) call leaves a marker file, so a test can count how often the executors
    enumerated. Pickled by value (below), so Spark's Python workers need not import this module.
    """

    name = "listed"

    def __init__(self, units: list[list[tuple[str, str]]], markers: Path):
        self._units, self._markers = units, str(markers)

    def units(self) -> list:
        return list(range(len(self._units)))

    def records(self, unit):
        import uuid

        from etl.records import InputRecord

        (Path(self._markers) / f"unit{unit}-{uuid.uuid4().hex}").write_bytes(b"")
        for split, key in self._units[unit]:
            yield InputRecord(key=key, split=split, label=0, source=key)


def _count(spark, units, markers: Path, train_shards=3, validation_shards=2):
    from pyspark import cloudpickle

    from etl.job import _enumerate_and_count, _ShardSlot

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        table = ([_ShardSlot("train", i, train_shards) for i in range(train_shards)]
                 + [_ShardSlot("validation", i, validation_shards) for i in range(validation_shards)])
        source = _ListedSource(units, markers)
        return _enumerate_and_count(spark.sparkContext, source, source.units(), table, 7, "listed")
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_count_pass_counts_per_split_and_its_shuffle_is_reused(spark, tmp_path):
    units = [[("train", f"train/a/{i}.JPEG") for i in range(40)],
             [("validation", f"validation/b/{i}.JPEG") for i in range(13)],
             [("train", f"train/c/{i}.JPEG") for i in range(5)]]
    shuffled, inputs = _count(spark, units, tmp_path)
    assert inputs == {"train": 45, "validation": 13}
    # Every record sits in the partition of its shard, sorted by the seeded order...
    from etl.sharding import order_key, shard_of

    parts = shuffled.mapPartitionsWithIndex(
        lambda i, it: [(i, [(k, r.split, r.key) for k, (_, r) in it])]).collect()
    slots = [("train", 3)] * 3 + [("validation", 2)] * 2
    for index, rows in parts:
        split, count = slots[index]
        assert [k for k, _, _ in rows] == sorted(k for k, _, _ in rows)
        for (slot, order), rsplit, key in rows:
            assert slot == index and rsplit == split
            assert shard_of(7, split, key, count) == index - (0 if split == "train" else 3)
            assert order == order_key(7, split, key)
    assert sum(len(rows) for _, rows in parts) == 58
    # ...and the second job read the shuffle output again: each unit was enumerated once.
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["unit0", "unit1", "unit2"]


@pytest.mark.parametrize("units, message", [
    ([[("train", "train/a/1.JPEG"), ("train", "train/a/2.JPEG")], [("train", "train/a/1.JPEG")]],
     r"1 duplicate input keys \(e\.g\. train/a/1\.JPEG\)"),
    ([[("train", "train/a/1.JPEG")], [("test", "test/a/1.JPEG")]], r"unknown splits \['test'\]"),
    ([[("train", "train/a/1.JPEG"), ("train", "validation/a/2.JPEG")]],
     r"1 keys outside their split, e\.g\. 'validation/a/2\.JPEG' in split 'train'"),
])
def test_source_mistakes_are_refused_by_name(spark, tmp_path, units, message):
    with pytest.raises(EtlError, match=message):
        _count(spark, units, tmp_path)


def test_job_runs_two_spark_jobs_and_enumerates_once(spark, tmp_path):
    """Spark's cost is mostly per job, stage and task: the whole job is one counting job and one
    writing job whose map stage is skipped (it reuses the counting job's shuffle)."""
    from tests.etl.corpus import photo_variants

    root = tmp_path / "imagenet"
    for i, data in enumerate(photo_variants(12, seed=3, size=(120, 90))):
        path = root / "train" / f"n0000000{i % 2}" / f"img_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    sc = spark.sparkContext
    sc.setJobGroup("etl-structure-test", "the ETL job's Spark jobs")
    try:
        manifest = prepare(EtlSettings(source="imagenet-folder", input=str(root),
                                       out=str(tmp_path / "ds"), resize="fixed:16",
                                       format="tfrecord", train_shards=3), spark=spark)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert manifest["splits"]["train"]["records"] == 12
    tracker = sc.statusTracker()
    jobs = sorted(tracker.getJobIdsForGroup("etl-structure-test"))
    assert len(jobs) == 2
    count_job, write_job = (tracker.getJobInfo(j) for j in jobs)
    assert count_job.status == write_job.status == "SUCCEEDED"
    # The write job's first stage (enumerate + shuffle write) is the count job's: never re-run.
    assert set(write_job.stageIds) & set(count_job.stageIds) == set() and len(write_job.stageIds) == 2
    ran = [tracker.getStageInfo(s) for s in write_job.stageIds]
    assert sum(1 for info in ran if info is not None and info.numCompletedTasks > 0) == 1
    # Only the 3 train shards are written: no task for the empty validation split.
    assert max(info.numTasks for info in ran if info is not None) == 3


# ------------------------------------------- a job that wrote (almost) nothing is not a success

def _etl_cli(*argv: str) -> int:
    """`bigticket etl prepare ...` in this process: the real parser and exit status, the shared
    local Spark session (the CLI joins it)."""
    import argparse

    import etl.cli

    parser = argparse.ArgumentParser(prog="bigticket etl")
    etl.cli.add_arguments(parser)
    return etl.cli.run(parser.parse_args(["prepare", *argv]))


def test_urls_run_with_every_input_refused_fails_before_success(spark, tmp_path, capsys):
    from tests.etl.http_server import TestServer
    from tests.etl.test_sources_folder import image_bytes

    with TestServer({f"i{i}": image_bytes(i) for i in range(10)}) as server:
        listing = tmp_path / "urls.tsv"
        listing.write_text("".join(f"n0{i % 2}\t{server.url(f'/img/i{i}')}\t"
                                   f"{'validation' if i % 5 == 0 else 'train'}\n" for i in range(10)))
        common = ["--source", "urls", "--input", str(listing), "--resize", "fixed:16",
                  "--format", "tfrecord", "--shards", "2", "--validation-shards", "1",
                  "--download-retries", "0"]
        out = tmp_path / "refused"
        assert _etl_cli(*common, "--out", str(out)) == 1  # a job failure, not a usage error (2)
        stdout, stderr = capsys.readouterr()
        assert stdout == ""  # no dataset path for a script to pick up
        assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
        lines = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
        assert len(lines) == 10 and {q["reason"] for q in lines} == {"download_error"}
        assert "bigticket etl prepare: failed:" in stderr
        assert "split train is empty: none of its 8 input(s) was written" in stderr
        assert "split validation is empty: none of its 2 input(s) was written" in stderr
        assert "top quarantine reasons (10 of 10 inputs)" in stderr
        assert "     10  download_error  e.g. http://127.0.0.1:" in stderr
        assert "(allow_private_addresses is off)" in stderr and "--allow-private-addresses" in stderr
        assert str(out / "quarantine.jsonl") in stderr
        assert len(stderr.splitlines()) <= 24  # one screen

        # Other settings into the same folder are refused, naming what to do; a new one works.
        assert _etl_cli(*common, "--out", str(out), "--allow-private-addresses") == 2
        assert "choose another --out or delete it" in capsys.readouterr().err
        good = tmp_path / "allowed"
        assert _etl_cli(*common, "--out", str(good), "--allow-private-addresses") == 0
        assert capsys.readouterr().out == f"{good}\n"  # stdout is the dataset path, alone
        assert load_manifest(good)["splits"]["train"]["records"] == 8


def test_quarantined_fraction_above_the_threshold_fails_and_a_rerun_can_accept_it(spark, tmp_path):
    """Digits with a byte cap that rejects some of them (too_large): above the threshold the job
    fails before _SUCCESS; the threshold is not part of the dataset's identity, so the same
    command with a higher one publishes the work already done instead of redoing it."""
    out = tmp_path / "digits"
    strict = _digits(out, format="tfrecord", max_image_bytes=125, max_quarantined_fraction=0.05)
    with pytest.raises(DatasetUnusable) as failed:
        prepare(strict, spark=spark)
    text = str(failed.value)
    assert "more than --max-quarantined-fraction 0.05" in text and "split train:" in text
    assert "too_large  e.g. " in text and "bytes > max_image_bytes 125" in text
    assert "-> raise --max-image-bytes" in text and "higher --max-quarantined-fraction" in text
    assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
    quarantined = (out / "quarantine.jsonl").read_text().splitlines()
    assert quarantined and all(json.loads(q)["reason"] == "too_large" for q in quarantined)
    shards = {p: p.stat().st_mtime_ns for p in out.glob("*/part-*")}

    relaxed = dataclasses.replace(strict, max_quarantined_fraction=0.9)
    assert dataset_hash(relaxed) == dataset_hash(strict)
    manifest = prepare(relaxed, spark=spark)
    assert (out / "_SUCCESS").exists()
    assert sum(s["quarantined"] for s in manifest["splits"].values()) == len(quarantined)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/part-*")} == shards  # nothing redone


def test_dataset_hash_is_pinned_and_ignores_the_quarantine_threshold():
    """Existing dataset directories keep their identity: the check-only fields are not hashed."""
    assert dataset_hash(EtlSettings(source="digits", out="a")) == "8561a8d8"
    assert dataset_hash(EtlSettings(source="digits", out="b", max_quarantined_fraction=0.9)) == "8561a8d8"
    assert dataset_hash(EtlSettings(source="urls", input="u.tsv", out="c", resize="fixed:16",
                                    train_shards=3, validation_shards=2)) == "fdb9148f"


# ---------------------------------------------------------------- where the job may write

def test_out_inside_or_equal_to_input_is_refused_before_anything_is_written(tmp_path, capsys):
    source = tmp_path / "imagenet"
    (source / "train" / "n01").mkdir(parents=True)
    (source / "train" / "n01" / "a.JPEG").write_bytes(b"x")
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    for out, where in ((source, "is --input"), (source / "in64", f"is inside --input {source}"),
                       (source / "train" / ".." / "x", "is inside --input")):
        assert _etl_cli("--source", "imagenet-folder", "--input", str(source),
                        "--out", str(out)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"bigticket etl prepare: error: --out {out}: {where}"), err
    (tmp_path / "link").symlink_to(source)  # resolved paths: a link to the source is the source
    with pytest.raises(OutputDirError, match="is inside --input"):
        check_output_dir(tmp_path / "link" / "out", source)
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before


def test_non_empty_out_without_a_manifest_is_refused_unless_it_is_our_unfinished_job(tmp_path):
    out = tmp_path / "out"
    check_output_dir(out, None)  # missing: fine
    out.mkdir()
    check_output_dir(out, None)  # empty: fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"--out .*/out: a non-empty folder that is not a "
                                             r"bigticket dataset \(no manifest.json; notes.txt"):
        check_output_dir(out, None)
    (out / "notes.txt").unlink()
    # What an unfinished job of ours leaves: the digits tree, split folders with shards and
    # temporaries, committed sidecars, an atomic write's temporary.
    (out / "_source" / "digits").mkdir(parents=True)
    (out / "train").mkdir()
    (out / "train" / "part-00000-of-00002.tfrecord").write_bytes(b"")
    (out / "train" / ".part-00001-of-00002.tfrecord.x1y2.tmp").write_bytes(b"")
    (out / "_staging" / "train").mkdir(parents=True)
    (out / ".quarantine.jsonl.abc.tmp").write_bytes(b"")
    check_output_dir(out, None)
    (out / "train" / "n01440764").mkdir()  # an ImageNet tree is not ours, even under train/
    with pytest.raises(OutputDirError, match="train/n01440764 not written by etl prepare"):
        check_output_dir(out, None)
    (out / "manifest.json").write_text("{}")  # a dataset: the job's identity check takes over
    check_output_dir(out, None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", None)
