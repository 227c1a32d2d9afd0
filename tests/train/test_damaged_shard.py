"""A shard damaged after the ETL job (same size, other bytes) passes the checks made before
training (sizes and manifest) and is named, with `etl verify`, when training reads it."""
from __future__ import annotations

import json

import pytest

from bigticket.cli import main
from train.damaged_shards import CorruptShardError, damaged_shards, raise_if_damaged
from train.data import open_dataset

TINY = ["--model", "conv_small", "--model-option", "blocks=1", "--model-option", "width=0.125",
        "--model-option", "dense=16", "--batch-size", "64", "--augment", "none", "--epochs", "2"]


def _flip_byte(path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("split", ["train", "validation"])
def test_training_names_the_damaged_shard_and_points_at_verify(digits_copy, tmp_path, capsys, split):
    shard = sorted((digits_copy / split).glob("*.tfrecord"))[-1]
    _flip_byte(shard)
    rc = main(["train", "dense", "--data", str(digits_copy), "--out", str(tmp_path / "runs"), *TINY])
    err = capsys.readouterr().err
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"bigticket train dense: error: {shard}: damaged shard of '{split}'")
    assert f"bigticket etl verify {digits_copy}" in last
    assert "Traceback" not in err and "DataLossError" not in err
    # the checks before training accept it: same size, manifest intact (contents are verify's)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "init.weights.h5").is_file()


def test_damaged_shards_compares_every_file_with_the_manifest(digits_copy):
    info = open_dataset(digits_copy)
    assert damaged_shards(info, "train", "parquet") == []
    parquet = info.shard_files("train", "parquet")[1]
    _flip_byte(parquet.path, 0.3)
    assert [s.path for s in damaged_shards(info, "train", "parquet")] == [parquet.path]
    # a read error while a shard differs: named; any other error: left to the caller
    with pytest.raises(CorruptShardError, match=f"{parquet.path}: damaged shard of 'train'"):
        raise_if_damaged(info, "train", "parquet", type("DataLossError", (Exception,), {})("x"))
    raise_if_damaged(info, "train", "parquet", ValueError("not a read error"))
    raise_if_damaged(info, "validation", "parquet",
                     type("DataLossError", (Exception,), {})("x"))  # validation is intact
    assert json.loads((digits_copy / "manifest.json").read_text())  # nothing else touched
