"""The Spark ETL job end to end, with real Spark, real files and real task failures."""
from __future__ import annotations

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
from etl.job import EtlError, prepare
from etl.manifest import load_manifest
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
