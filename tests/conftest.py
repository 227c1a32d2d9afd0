"""Shared fixtures: a real local SparkSession for the whole session, quiet TensorFlow."""
from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only, also on GPU hosts


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
