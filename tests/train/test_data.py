"""tf.data readers over a real ETL dataset directory (both formats)."""
from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest

from etl.manifest import DatasetError
from etl.parquet_io import iter_parquet
from train.data import make_dataset, open_dataset


def _records(ds) -> list[tuple[str, int]]:
    """(hash of the decoded pixels, label) per record, in order."""
    out = []
    for images, labels in ds:
        for image, label in zip(images.numpy(), labels.numpy()):
            out.append((hashlib.sha1(image.tobytes()).hexdigest(), int(label)))
    return out


def _parquet_labels(info, split):
    return collections.Counter(row["label"] for f in info.shard_files(split, "parquet")
                               for row in iter_parquet(f.path, columns=("label",)))


def test_open_dataset_reads_the_manifest(digits):
    assert digits.num_classes == 10
    assert [c["index"] for c in digits.classes] == list(range(10))
    assert set(digits.formats) == {"tfrecord", "parquet"}
    assert digits.records["train"] + digits.records["validation"] == 1797
    assert digits.image_size == 16 and digits.label_offset == 1
    assert len(digits.shard_files("train", "tfrecord")) == 3
    assert sum(f.records for f in digits.shard_files("validation")) == digits.records["validation"]


def test_evaluation_covers_every_validation_record_once_in_both_formats(digits):
    kwargs = dict(batch_size=64, training=False, input_size=16)
    tf_recs = _records(make_dataset(digits, "validation", fmt="tfrecord", **kwargs))
    pq_recs = _records(make_dataset(digits, "validation", fmt="parquet", **kwargs))
    assert len(tf_recs) == digits.records["validation"]
    assert tf_recs == pq_recs  # same images, same labels, same order
    # labels: TFRecord's offset removed, and they agree with the Parquet column read directly
    assert collections.Counter(label for _, label in tf_recs) == _parquet_labels(digits, "validation")
    assert len(set(tf_recs)) > 0.95 * len(tf_recs)  # distinct images, not one record repeated


@pytest.mark.parametrize("workers", [2, 5])  # 3 train files: by file for 2, by record for 5
def test_workers_never_share_a_record_and_together_see_all(digits, workers):
    parts = [_records(make_dataset(digits, "train", batch_size=128, training=False, input_size=16,
                                   worker_index=w, num_workers=workers))
             for w in range(workers)]
    assert [len(p) for p in parts] == [digits.worker_records("train", w, workers)
                                      for w in range(workers)]
    assert sum(len(p) for p in parts) == digits.records["train"]
    everything = _records(make_dataset(digits, "train", batch_size=128, training=False,
                                       input_size=16))
    assert collections.Counter(r for p in parts for r in p) == collections.Counter(everything)


def test_training_order_and_augmentation_are_fixed_by_seed_and_epoch(digits):
    def batches(seed, epoch):
        ds = make_dataset(digits, "train", batch_size=32, training=True, input_size=16,
                          seed=seed, epoch=epoch, augment="crop_flip")
        return [(x.numpy(), y.numpy()) for x, y in ds.take(3)]

    first, again, other_epoch = batches(1, 2), batches(1, 2), batches(1, 3)
    for (xa, ya), (xb, yb) in zip(first, again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other_epoch))
    x, y = first[0]
    assert x.shape == (32, 16, 16, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 255.0
    # augmentation: the same records decoded without it differ from the augmented ones
    plain = make_dataset(digits, "train", batch_size=32, training=True, input_size=16, seed=1,
                         epoch=2, augment="none")
    xp, yp = next(iter(plain))
    np.testing.assert_array_equal(yp.numpy(), y)
    assert not np.array_equal(xp.numpy(), x)


def test_repeat_gives_a_new_order_each_pass(digits):
    n = digits.records["train"]
    ds = make_dataset(digits, "train", batch_size=n, training=True, input_size=16, repeat=True,
                      augment="none")
    it = iter(ds)
    first, second = next(it)[1].numpy(), next(it)[1].numpy()
    assert len(first) == len(second) == n
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)


def test_shard_files_stream_exactly_the_given_shards(digits, tmp_path):
    files = [f.path for f in digits.shard_files("train", "parquet")][1:]
    recs = _records(make_dataset(digits, "train", batch_size=256, training=False, input_size=16,
                                 shard_files=files))
    assert len(recs) == sum(f.records for f in digits.shard_files("train", "parquet")[1:])
    stray = tmp_path / "part-00000-of-00003.tfrecord"
    stray.write_bytes(b"")
    with pytest.raises(ValueError, match="is not a 'train' shard of dataset"):
        make_dataset(digits, "train", batch_size=8, training=False, input_size=16,
                     shard_files=[stray])


def test_refuses_unfinished_or_damaged_datasets(digits_copy):
    shard = sorted((digits_copy / "train").glob("*.tfrecord"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DatasetError, match=f"{shard}: {len(data) - 10} bytes on disk"):
        open_dataset(digits_copy)
    shard.unlink()
    with pytest.raises(DatasetError, match=f"{shard}: shard listed in .* is missing"):
        open_dataset(digits_copy)
    (digits_copy / "_SUCCESS").unlink()
    with pytest.raises(DatasetError, match="_SUCCESS: missing"):
        open_dataset(digits_copy)


def test_augmentation_crops_and_flips_each_image_of_a_batch_on_its_own(digits):
    """Vectorised augmentation: every image is a window of its own reflect-padded original,
    at its own offset, flipped or not on its own."""
    kwargs = dict(batch_size=48, training=True, input_size=16, seed=3, epoch=1)
    plain_x, plain_y = next(iter(make_dataset(digits, "train", augment="none", **kwargs)))
    aug_x, aug_y = next(iter(make_dataset(digits, "train", augment="crop_flip", **kwargs)))
    np.testing.assert_array_equal(plain_y.numpy(), aug_y.numpy())  # same records, same order
    pad = 2  # 16 // 8
    draws = []
    for original, augmented in zip(plain_x.numpy(), aug_x.numpy()):
        padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        found = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 for flip in (False, True)
                 if np.array_equal((lambda w: w[:, ::-1] if flip else w)(
                     padded[dy:dy + 16, dx:dx + 16]), augmented)]
        assert found, "an augmented image is not a (flipped) crop of its own padded original"
        draws.append(found[0])
    assert len({d[:2] for d in draws}) > 3          # offsets differ between images
    assert {d[2] for d in draws} == {False, True}   # some flipped, some not
