"""The ImageNet-scale ETL path (bench/etl_scale.py) in small: a hard-linked imagenet-folder tree
with a flat validation folder, into many shards, with the driver's Python memory bounded."""
from __future__ import annotations

import tracemalloc

import pytest

from etl.job import prepare
from etl.manifest import load_manifest
from etl.samples import build_imagenet_tree, imagenet_tree_counts
from etl.settings import EtlSettings

CLASSES, PER_CLASS, VALIDATION = 100, 190, 1000  # 20,000 entries
# Everything the driver allocates for 20,000 inputs, at its peak. Measured about 0.7 MB (units,
# summaries, sidecars, the manifest); one small object per input (a key and a label, an
# InputRecord) would add 2 to 8 MB.
DRIVER_PEAK_BYTES = 2_000_000


def test_tree_counts_follow_imagenet():
    per_class, validation = imagenet_tree_counts(1.0)
    assert len(per_class) == 1000 and sum(per_class) == 1_281_167 and validation == 50_000
    assert max(per_class) - min(per_class) <= 1
    per_class, validation = imagenet_tree_counts(0.1)
    assert sum(per_class) == 128_117 and validation == 5000


@pytest.mark.slow
def test_many_shards_from_a_hard_linked_tree_reconcile_with_a_bounded_driver(spark, tmp_path):
    tree = build_imagenet_tree(tmp_path / "imagenet", [PER_CLASS] * CLASSES, VALIDATION,
                               image_size=(40, 30))
    files = {p.stat().st_ino for p in (tmp_path / "imagenet.pool").iterdir()}
    assert len(files) == tree["files"] < 20  # a few real photos behind 20,000 names
    settings = EtlSettings(source="imagenet-folder", input=tree["root"], out=str(tmp_path / "out"),
                           val_ground_truth_file=tree["ground_truth"], resize="fixed:16",
                           format="tfrecord", train_shards=64, validation_shards=8)
    tracemalloc.start()
    try:
        manifest = prepare(settings, spark=spark)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    splits = manifest["splits"]
    assert {s: (v["inputs"], v["records"], v["quarantined"]) for s, v in splits.items()} == {
        "train": (CLASSES * PER_CLASS,) * 2 + (0,), "validation": (VALIDATION,) * 2 + (0,)}
    assert len(splits["train"]["shards"]) == 64 and len(splits["validation"]["shards"]) == 8
    assert sum(s["records"] for s in splits["train"]["shards"]) == CLASSES * PER_CLASS
    assert load_manifest(settings.out)["settings_hash"] == manifest["settings_hash"]
    assert peak < DRIVER_PEAK_BYTES, f"driver Python peak {peak} bytes for 20,000 inputs"
