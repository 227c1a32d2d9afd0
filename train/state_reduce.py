"""The record-weighted average of the workers' states, reduced on the executors in a fixed tree.

A round of `train.elephas_engine.SparkDataParallel` ends with one state per worker (weights and
optimizer variables). Each training task emits its state as a leaf keyed by its worker index.
Each level of the tree re-keys by `position // fan_in` and shuffles to ceil(count / fan_in)
reduce tasks, each merging at most `fan_in` inputs; the last level has one task, which also
divides by the records, and its result is the only thing the driver collects. So the driver
receives one state per round and a reduce task holds at most fan_in inputs, whatever the
number of workers (`tree_shape` picks the fan-in from it: at most MAX_FAN_IN).

Arithmetic, the same average as `elephas_engine.average_states` (the driver-side reference):
- float arrays: sum_i n_i * w_i accumulated in float64 (each product is exact), divided by
  N = sum_i n_i once and cast back to the array's dtype. The reference computes
  base - sum_i (n_i / N) * (base - w_i), the same number in exact arithmetic, with its deltas
  base - w_i rounded to float32 (exact while w_i is within a factor 2 of base, as after
  ordinary steps). Tolerance, per element: one float32 unit in the last place of the result,
  plus half a float32 ulp of the largest |base - w_i| (the reference's delta rounding), plus
  4 * workers * 2**-53 * max_i |w_i| (float64 summation, visible only where the workers'
  values cancel). A worker with no records contributes nothing.
- integer arrays (optimizer iterations): the largest worker value, i.e. the base advanced by
  the largest worker advance (workers step in parallel).
- merge order is fixed by the tree and, inside a merge, by position: inputs that arrive early
  wait for their turn. A round's result never depends on task scheduling or retries.

Pure NumPy: reduce tasks do not import TensorFlow.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterable, Iterator

import numpy as np

from train.faults import armed_fault, kill_this_worker

MAX_FAN_IN = 8


@dataclasses.dataclass
class Partial:
    """Some workers' states merged: a leaf (one worker, its own arrays) or a weighted sum."""

    records: int
    arrays: list          # leaf: the worker's arrays; weighted: float64 sums n_i*w_i, int maxima
    dtypes: list[str]     # the state's dtypes, restored by finish()
    reports: list[dict]   # the workers' reports (no arrays)
    weighted: bool = False
    merge_s: float = 0.0  # merging time along the slowest path from a leaf to here


def is_counter(dtype) -> bool:
    dtype = np.dtype(dtype)
    return bool(np.issubdtype(dtype, np.integer) or dtype == np.bool_)


def leaf(records: int, arrays: list, report: dict) -> Partial:
    arrays = [np.asarray(a) for a in arrays]
    return Partial(int(records), arrays, [a.dtype.str for a in arrays], [report])


def _weighted(p: Partial) -> Partial:
    if p.weighted:
        return p
    sums = []
    for a in p.arrays:
        if is_counter(a.dtype):
            sums.append(np.array(a, copy=True))
        elif p.records:  # asarray: ufuncs turn 0-d arrays (learning rate) into scalars
            sums.append(np.asarray(np.multiply(a, float(p.records), dtype=np.float64)))
        else:  # nothing trained: contributes nothing (0 * inf would not be nothing)
            sums.append(np.zeros(a.shape, np.float64))
    return Partial(p.records, sums, p.dtypes, p.reports, True, p.merge_s)


def merge(acc: Partial | None, p: Partial) -> Partial:
    """acc + p (acc is reused); the caller fixes the order."""
    p = _weighted(p)
    if acc is None:
        # Arrays unpickled from a shuffle may be read-only views of its buffer.
        arrays = [a if a.flags.writeable else a.copy() for a in p.arrays]
        return dataclasses.replace(p, arrays=arrays, reports=list(p.reports))
    if len(acc.arrays) != len(p.arrays):
        raise ValueError(f"merge: states of {len(acc.arrays)} and {len(p.arrays)} arrays")
    for j, (a, b) in enumerate(zip(acc.arrays, p.arrays)):
        if is_counter(acc.dtypes[j]):
            np.maximum(a, b, out=a)
        else:
            a += b
    acc.records += p.records
    acc.reports.extend(p.reports)
    acc.merge_s = max(acc.merge_s, p.merge_s)
    return acc


def finish(p: Partial) -> dict[str, Any]:
    """The average: {"records", "arrays" (None when no worker trained), "reports", "merge_s"}."""
    p = _weighted(p)
    arrays = None
    if p.records > 0:
        arrays = []
        for s, dtype in zip(p.arrays, p.dtypes):
            if not is_counter(dtype):
                s = np.divide(s, p.records, out=s)
            arrays.append(s.astype(np.dtype(dtype), copy=False))
    reports = sorted(p.reports, key=lambda r: r["worker_index"])
    return {"records": p.records, "arrays": arrays, "reports": reports, "merge_s": p.merge_s}


def tree_shape(workers: int, max_fan_in: int = MAX_FAN_IN) -> tuple[int, list[int]]:
    """(fan_in, reduce tasks per level): the fewest levels with fan-in <= max_fan_in, and the
    smallest fan-in that reaches one task in that many levels. One worker: (1, [])."""
    if max_fan_in < 2:
        raise ValueError(f"max_fan_in: expected an integer >= 2, got {max_fan_in!r}")
    if workers <= 1:
        return 1, []
    depth = 1
    while max_fan_in ** depth < workers:
        depth += 1
    fan_in = 2
    while fan_in ** depth < workers:
        fan_in += 1
    sizes, count = [], workers
    while count > 1:
        count = -(-count // fan_in)
        sizes.append(count)
    return fan_in, sizes


def _rekey(fan_in: int, item: tuple[int, Partial]) -> tuple[int, tuple[int, Partial]]:
    position, partial = item
    return position // fan_in, (position, partial)


def _own_partition(key: int) -> int:
    return key


def _merge_children(level: int, fan_in: int, count: int,
                    items: Iterable[tuple[int, tuple[int, Partial]]]) -> Iterator[tuple[int, Partial]]:
    """One reduce task: merge children key*fan_in .. in position order (early ones wait)."""
    acc, pending, key, nxt, end, die_after = None, {}, None, 0, 0, None
    for k, (position, partial) in items:
        if key is None:
            key, nxt = k, k * fan_in
            end = min(nxt + fan_in, count)
            die_after = armed_fault(f"merge{level}", key)
        t0 = time.perf_counter()
        pending[position] = partial
        while nxt in pending:
            if die_after is not None and nxt - key * fan_in == die_after:
                kill_this_worker()
            acc = merge(acc, pending.pop(nxt))
            nxt += 1
        if acc is not None:
            acc.merge_s += time.perf_counter() - t0
    if key is None:
        return
    if pending or nxt != end:
        raise RuntimeError(f"reduce level {level}, task {key}: got inputs "
                           f"{sorted(pending)} but not {nxt} (expected {key * fan_in}..{end - 1})")
    yield key, acc


def _finish_partition(items: Iterable[tuple[int, Partial]]) -> Iterator[dict]:
    for _, partial in items:
        yield finish(partial)


def reduce_on_executors(leaves, workers: int, max_fan_in: int = MAX_FAN_IN):
    """An RDD of one element, the finished average, from an RDD of (worker_index, leaf)."""
    fan_in, sizes = tree_shape(workers, max_fan_in)
    rdd, count = leaves, workers
    for level, size in enumerate(sizes, start=1):
        rdd = (rdd.map(functools.partial(_rekey, fan_in))
               .partitionBy(size, _own_partition)
               .mapPartitions(functools.partial(_merge_children, level, fan_in, count),
                              preservesPartitioning=True))
        count = size
    return rdd.mapPartitions(_finish_partition)
