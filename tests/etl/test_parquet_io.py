"""Parquet shard schema, byte-sized row groups and streaming reads (real pyarrow files)."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.parquet_io import SCHEMA, ParquetShardError, iter_parquet, open_parquet, write_parquet
from tests.etl.test_shard_writer import make_rows


def test_schema_and_round_trip(tmp_path):
    rows = make_rows(6)
    path = tmp_path / "shard.parquet"
    assert write_parquet(iter(rows), path) == 6
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    assert schema.field("key").type == pa.string()
    assert schema.field("image").type == pa.binary()
    assert schema.field("label").type == pa.int32()
    assert schema.field("synset").type == pa.string()
    assert schema.field("height").type == pa.int32() and schema.field("width").type == pa.int32()
    assert pf.metadata.num_rows == 6
    got = list(iter_parquet(path))
    assert got == [{"key": r.key, "image": r.jpeg, "label": r.label, "synset": r.synset,
                    "height": r.height, "width": r.width, "filename": r.filename,
                    "class_text": r.class_text} for r in rows]


def test_row_groups_are_cut_by_bytes(tmp_path):
    rows = make_rows(20)
    per_row = max(len(r.jpeg) for r in rows)
    path = tmp_path / "groups.parquet"
    write_parquet(rows, path, row_group_bytes=3 * per_row)
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 20
    assert meta.num_row_groups >= 20 // 4  # about three images per group, never all in one
    assert max(sizes) <= 4
    big = tmp_path / "one.parquet"
    write_parquet(rows, big)  # the 32 MiB default keeps these tiny rows in one group
    assert pq.ParquetFile(big).metadata.num_row_groups == 1


def test_streams_one_row_group_at_a_time(tmp_path):
    rows = make_rows(9)
    path = tmp_path / "s.parquet"
    write_parquet(rows, path, row_group_bytes=1)  # one row per group
    it = iter_parquet(path, columns=["key", "label"])
    assert next(it) == {"key": rows[0].key, "label": rows[0].label}
    assert [r["key"] for r in it] == [r.key for r in rows[1:]]


def test_writes_to_a_file_object_and_empty_input(tmp_path):
    buf = io.BytesIO()
    assert write_parquet([], buf) == 0
    path = tmp_path / "empty.parquet"
    path.write_bytes(buf.getvalue())
    assert pq.ParquetFile(path).schema_arrow.equals(SCHEMA)
    assert list(iter_parquet(path)) == []


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "s.parquet"
    write_parquet(make_rows(2), path)
    with pytest.raises(ParquetShardError, match=r"s\.parquet: no column\(s\) \['pixels'\]"):
        list(iter_parquet(path, columns=["pixels"]))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ParquetShardError, match=r"junk\.parquet: unreadable Parquet footer"):
        open_parquet(junk)
    with pytest.raises(ValueError, match="row_group_bytes"):
        write_parquet([], tmp_path / "x.parquet", row_group_bytes=0)


def test_flipped_bit_in_page_is_detected_without_the_manifest(tmp_path):
    rows = make_rows(4, size=(40, 40))
    path = tmp_path / "c.parquet"
    write_parquet(rows, path)
    data = bytearray(path.read_bytes())
    # Flip a bit inside the first image's JPEG bytes as stored in the (uncompressed) page.
    at = bytes(data).index(rows[0].jpeg[100:140]) + 10
    data[at] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(ParquetShardError, match=r"c\.parquet: row group 0 unreadable"):
        list(iter_parquet(path))
