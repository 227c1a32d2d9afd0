"""What an elephas round costs the Spark driver: the check before round 0, and the measurement.

Since the averaging is reduced on the executors (`train.state_reduce`), the driver's JVM holds,
per round, about three copies of the state (weights + optimizer variables): the broadcast of the
round's starting state, the one averaged state it collects, and that result again while it is
handed to Python. In local mode the executors' tasks run in the same JVM, and each running task
also passes a state (float64 partial sums: two copies' worth) through it. `check` compares that
with the live JVM's heap and with spark.driver.maxResultSize before round 0: a round that cannot
fit is refused with the setting to change instead of a Java OutOfMemoryError (or Spark's
"bigger than spark.driver.maxResultSize" abort) in round 0; a tight one is warned about.
`DriverPeak` measures what the driver's Python side holds at once during a round (tracemalloc).
"""
from __future__ import annotations

import logging
import math
import pickle
import tracemalloc

log = logging.getLogger(__name__)

MIB = 1 << 20
# Spark's driver heap minus this is what Spark itself may use (UnifiedMemoryManager's reserve).
SPARK_RESERVED_BYTES = 300 * MIB
REPORT_BYTES_PER_WORKER = 4096   # a worker's pickled report travels with the averaged state


class DriverMemoryError(ValueError):
    """A round cannot fit the driver's Spark settings; the message names the setting to change."""


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def _setting(n: float) -> str:
    """A Spark size of at least n bytes: a power of two MiB."""
    return f"{2 ** max(0, math.ceil(math.log2(max(n, 1) / MIB)))}m"


def driver_plan(sc, state_bytes: int, workers: int) -> dict:
    """The figures `check` compares: bytes per round against the live driver's limits."""
    jvm = sc._jvm
    text = sc.getConf().get("spark.driver.maxResultSize", "1g")
    max_result = int(jvm.org.apache.spark.network.util.JavaUtils.byteStringAsBytes(text))
    local = str(sc.master).startswith("local")
    concurrent = min(workers, sc.defaultParallelism) if local else 0
    copies = 3 + 2 * concurrent
    return {
        "state_bytes": int(state_bytes),
        "result_bytes": int(state_bytes) + REPORT_BYTES_PER_WORKER * workers,
        "max_result_size": max_result, "max_result_size_setting": text,
        "heap_bytes": int(jvm.java.lang.Runtime.getRuntime().maxMemory()),
        "local": local, "concurrent_tasks": concurrent, "copies": copies,
        "held_bytes": copies * int(state_bytes),
    }


def check(sc, state_bytes: int, workers: int) -> dict:
    """Raise DriverMemoryError when a round cannot fit the driver; warn when it may not."""
    plan = driver_plan(sc, state_bytes, workers)
    local_hint = (f"; in local mode every running task passes its state through the driver's "
                  f"JVM too: fewer at once (local[N] with N < {plan['concurrent_tasks']}) also "
                  f"helps" if plan["local"] and plan["concurrent_tasks"] > 1 else "")
    if 0 < plan["max_result_size"] < plan["result_bytes"]:
        need = _setting(plan["result_bytes"] * 1.25)
        raise DriverMemoryError(
            f"elephas: each round sends the driver one averaged state of "
            f"{_mib(plan['result_bytes'])} (weights + optimizer state), over "
            f"spark.driver.maxResultSize={plan['max_result_size_setting']}: set it to {need} or "
            f"more (spark-submit --conf spark.driver.maxResultSize={need}; locally "
            f"PYSPARK_SUBMIT_ARGS='--conf spark.driver.maxResultSize={need} pyspark-shell'), "
            f"or train a smaller model")
    need = _setting(plan["held_bytes"] + SPARK_RESERVED_BYTES)
    what = (f"about {_mib(plan['held_bytes'])} ({plan['copies']} copies of the "
            f"{_mib(state_bytes)} weights + optimizer state) in the driver's JVM, whose heap is "
            f"{_mib(plan['heap_bytes'])}")
    fix = (f"set spark.driver.memory to {need} or more (spark-submit --driver-memory {need}; "
           f"locally PYSPARK_SUBMIT_ARGS='--driver-memory {need} pyspark-shell'){local_hint}")
    if plan["held_bytes"] > plan["heap_bytes"]:
        raise DriverMemoryError(f"elephas: a round holds {what}: {fix}")
    if plan["held_bytes"] + SPARK_RESERVED_BYTES > plan["heap_bytes"]:
        log.warning("elephas: a round holds %s, leaving Spark less than its %s reserve; if the "
                    "driver runs out of memory, %s", what, _mib(SPARK_RESERVED_BYTES), fix)
    return plan


def received_bytes(arrays, reports) -> int:
    """Serialized size of what a collect brought to the driver: array bytes plus the reports."""
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays or ()) + len(pickle.dumps(reports))


class DriverPeak:
    """Peak bytes the driver's Python side (Python objects and NumPy buffers, via tracemalloc)
    holds at once during the block, beyond what it held when the block began."""

    def __enter__(self) -> "DriverPeak":
        self._started = not tracemalloc.is_tracing()
        if self._started:
            tracemalloc.start()
        self._base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        self.bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = max(0, tracemalloc.get_traced_memory()[1] - self._base)
        if self._started:
            tracemalloc.stop()
