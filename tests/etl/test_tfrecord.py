"""etl.tfrecord against real TensorFlow: our files parse with tf.data, TF's files read with ours."""
from __future__ import annotations

import io
import struct
import sys

import pytest

from etl.tfrecord import CorruptRecordError, TFRecordWriter, decode_example, encode_example, iter_records, masked_crc32c
from tests.etl.test_shard_writer import make_rows


# The feature spec of the TensorFlow reference ImageNet readers.
def _imagenet_spec(tf):
    return {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/channels": tf.io.FixedLenFeature([], tf.int64),
        "image/colorspace": tf.io.FixedLenFeature([], tf.string),
        "image/filename": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/class/synset": tf.io.FixedLenFeature([], tf.string),
        "image/class/text": tf.io.FixedLenFeature([], tf.string),
    }


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


def test_module_does_not_import_tensorflow():
    import subprocess

    code = ("import sys, etl.tfrecord, etl.parquet_io, etl.shard_writer, etl.manifest, "
            "etl.verify; print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_masked_crc_known_vector():
    # CRC32C("123456789") = 0xE3069283 (the standard check value), masked per the TFRecord spec.
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF)
                                           + 0xA282EAD8) & 0xFFFFFFFF


def test_encoding_equals_protobuf_deterministic_serialization(tf):
    row = make_rows(1)[0]
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/height": tf.train.Feature(int64_list=tf.train.Int64List(value=[row.height])),
        "image/width": tf.train.Feature(int64_list=tf.train.Int64List(value=[row.width])),
        "image/colorspace": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"RGB"])),
        "image/channels": tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
        "image/class/label": tf.train.Feature(
            int64_list=tf.train.Int64List(value=[row.label + 1])),
        "image/class/synset": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[row.synset.encode()])),
        "image/class/text": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[row.class_text.encode()])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"JPEG"])),
        "image/filename": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[row.filename.encode()])),
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row.jpeg])),
    }))
    assert encode_example(row) == example.SerializeToString(deterministic=True)


def test_tensorflow_reads_our_files(tf, tmp_path):
    rows = make_rows(5)
    path = tmp_path / "ours.tfrecord"
    with open(path, "wb") as fh:
        writer = TFRecordWriter(fh)
        for row in rows:
            writer.write(encode_example(row))
    assert writer.records == 5
    spec = _imagenet_spec(tf)
    parsed = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(path))]
    assert len(parsed) == len(rows)
    for p, row in zip(parsed, rows):
        assert int(p["image/class/label"]) == row.label + 1
        assert p["image/class/synset"].numpy().decode() == row.synset
        assert p["image/class/text"].numpy().decode() == row.class_text
        assert p["image/filename"].numpy().decode() == row.filename
        assert p["image/encoded"].numpy() == row.jpeg
        assert (int(p["image/height"]), int(p["image/width"])) == (row.height, row.width)
        assert p["image/colorspace"].numpy() == b"RGB" and int(p["image/channels"]) == 3
        assert p["image/format"].numpy() == b"JPEG"
        pixels = tf.io.decode_jpeg(p["image/encoded"], channels=3)
        assert tuple(pixels.shape) == (row.height, row.width, 3)


def test_we_read_tensorflow_files(tf, tmp_path):
    path = tmp_path / "theirs.tfrecord"
    payloads = [b"", b"x", bytes(range(256)) * 40]
    examples = [tf.train.Example(features=tf.train.Features(feature={
        "a": tf.train.Feature(int64_list=tf.train.Int64List(value=[-5, 0, 2 ** 40])),
        "b": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, -1.25])),
        "c": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"p", b""])),
        "d": tf.train.Feature(int64_list=tf.train.Int64List(value=[])),
    })).SerializeToString()]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in payloads + examples:
            writer.write(record)
    records = list(iter_records(path))
    assert records == payloads + examples
    assert decode_example(records[-1]) == {"a": [-5, 0, 2 ** 40], "b": [0.5, -1.25],
                                           "c": [b"p", b""], "d": []}


def _framed(records: list[bytes]) -> bytes:
    buf = io.BytesIO()
    writer = TFRecordWriter(buf)
    for r in records:
        writer.write(r)
    return buf.getvalue()


def test_decode_accepts_unpacked_ints_and_skips_unknown_fields():
    # Example{features{feature{key:"n" value{int64_list{value:7 value:-1 (unpacked)}}}}}, plus an
    # unknown varint field 5 at the top level.
    int_list = b"\x08\x07" + b"\x08" + b"\xff" * 9 + b"\x01"
    feature = b"\x1a" + bytes([len(int_list)]) + int_list
    entry = b"\x0a\x01n" + b"\x12" + bytes([len(feature)]) + feature
    features = b"\x0a" + bytes([len(entry)]) + entry
    data = b"\x0a" + bytes([len(features)]) + features + b"\x28\x01"
    assert decode_example(data) == {"n": [7, -1]}


def test_crc_errors_name_file_and_offset(tmp_path):
    records = [b"first record", b"second record payload", b"third"]
    good = _framed(records)
    path = tmp_path / "shard.tfrecord"
    path.write_bytes(good)
    assert list(iter_records(path)) == records
    assert list(iter_records(io.BytesIO(good))) == records

    second = 12 + len(records[0]) + 4  # byte offset of the second record's header
    data = bytearray(good)
    data[second + 12 + 3] ^= 0x01  # flip one bit in the second payload
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match=rf"shard\.tfrecord: record 1 at byte offset "
                                                 rf"{second}: data CRC mismatch"):
        list(iter_records(path))

    data = bytearray(good)
    data[second + 2] ^= 0x40  # flip a bit of the second length
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match=rf"offset {second}: length CRC mismatch"):
        list(iter_records(path))


@pytest.mark.parametrize("cut", [1, 5, 12, 20, 4])
def test_truncated_tail_is_reported(tmp_path, cut):
    records = [b"a" * 30, b"b" * 30]
    good = _framed(records)
    path = tmp_path / "cut.tfrecord"
    path.write_bytes(good[:-cut])
    seen = []
    with pytest.raises(CorruptRecordError, match=rf"cut\.tfrecord: record 1 at byte offset "
                                                 rf"{12 + 30 + 4}: truncated"):
        for r in iter_records(path):
            seen.append(r)
    assert seen == records[:1]


def test_oversized_length_is_refused(tmp_path):
    header = struct.pack("<Q", 10 ** 12)
    data = header + struct.pack("<I", masked_crc32c(header))
    with pytest.raises(CorruptRecordError, match="exceeds"):
        list(iter_records(io.BytesIO(data)))


def test_negative_label_is_refused():
    row = make_rows(1)[0]
    bad = type(row)(**{**row.__dict__, "label": -1})
    with pytest.raises(ValueError, match="label -1"):
        encode_example(bad)
