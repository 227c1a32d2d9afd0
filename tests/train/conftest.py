"""A real digits dataset (both shard formats, few shards) prepared once per session by the ETL job."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_dir(spark, tmp_path_factory) -> Path:
    """1,797 8x8 digits resized to 16x16 RGB JPEG: 3 train and 2 validation shards per format."""
    from etl.job import prepare
    from etl.settings import EtlSettings

    out = tmp_path_factory.mktemp("train-data") / "digits16"
    prepare(EtlSettings(source="digits", out=str(out), resize="fixed:16", format="both",
                        train_shards=3, validation_shards=2), spark=spark)
    return out


@pytest.fixture(scope="session")
def digits(digits_dir):
    from train.data import open_dataset

    return open_dataset(digits_dir)


@pytest.fixture()
def digits_copy(digits_dir, tmp_path) -> Path:
    """A private copy to damage."""
    copy = tmp_path / "digits-copy"
    shutil.copytree(digits_dir, copy)
    return copy
