"""Shared fixtures: a real local SparkSession for the whole session, quiet TensorFlow, and a real
digits dataset (both shard formats, few shards) prepared once per session by the ETL job."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only, also on GPU hosts


# `make test` spreads the tests over two pytest-xdist workers (--dist loadgroup). These share
# one machine-wide resource each and so run in one worker: the SLURM test cluster (slurmd,
# slurmctld, its spool) and the faked 4-GPU node's claim locks.
_ONE_WORKER = {"cluster": ("tests/cluster/", "tests/train/test_gpu_binding.py")}


def pytest_collection_modifyitems(config, items):
    # Every other file runs whole in one worker, in its order: tests of a file may build on
    # module-scoped fixtures an earlier test of the file filled.
    for item in items:
        where = Path(str(item.path)).as_posix()
        group = next((g for g, prefixes in _ONE_WORKER.items()
                      if any(f"/{prefix}" in where for prefix in prefixes)), where)
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession shared by all tests (Spark allows one context per process).

    Tests that need another master (local[2,4] for retries, local-cluster, standalone) run the
    job in a subprocess instead.
    """
    from common.spark import get_spark

    session = get_spark(
        "bigticket-tests",
        master="local[2]",
        conf={"spark.ui.enabled": "false", "spark.driver.memory": "2g",
              "spark.ui.showConsoleProgress": "false"},
    )
    yield session
    session.stop()


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
