"""Build or join the SparkSession: one place for the settings every bigticket Spark job wants.

Under spark-submit the master and resources come from spark-submit's own configuration, so
`master=None` leaves them alone; locally we default to local[*].
"""
from __future__ import annotations

import os
import sys


def get_spark(app_name: str, master: str | None = None, conf: dict[str, str] | None = None):
    from pyspark.sql import SparkSession

    # Executors must run the same interpreter (and so the same venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    elif "SPARK_HOME" not in os.environ and not os.environ.get("SPARK_ENV_LOADED"):
        builder = builder.master("local[*]")
    defaults = {
        "spark.ui.showConsoleProgress": "true",
        # Reused Python workers keep imports (and, for training, the built model) across tasks.
        "spark.python.worker.reuse": "true",
        "spark.sql.shuffle.partitions": "8",
    }
    for key, value in {**defaults, **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("BIGTICKET_SPARK_LOG_LEVEL", "WARN"))
    return spark
