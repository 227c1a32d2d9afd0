"""Averaging on the executors (train.state_reduce) against the driver-side reference
(train.elephas_engine.average_states), in NumPy and on real local Spark.

Tolerance (train/state_reduce.py), per element: one float32 unit in the last place of the result,
plus half a float32 ulp of the largest |base - w_i| (the reference rounds its deltas to float32),
plus the float64 summation error 4 * workers * 2**-53 * max_i |w_i|.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from tests.train.test_elephas_engine import (
    COMPILE,
    _engine,
    _write_shard,
    momentum_sgd,
    tfrecord_dataset,
    tiny_model,
)
from train.driver_memory import DriverMemoryError, check, driver_plan
from train.elephas_engine import SparkDataParallel, average_states
from train.state_reduce import _merge_children, finish, leaf, merge, tree_shape


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    return {"a": _write_shard(root / "a.tfrecord", 96, rng),
            "b": _write_shard(root / "b.tfrecord", 32, rng)}


def assert_within_tolerance(actual, reference, base, states):
    """The stated tolerance, element by element (integers: exactly equal)."""
    workers = len(states)
    for j, (a, r) in enumerate(zip(actual, reference)):
        a, r = np.asarray(a), np.asarray(r)
        assert a.dtype == r.dtype and a.shape == r.shape, j
        if not np.issubdtype(r.dtype, np.floating):
            np.testing.assert_array_equal(a, r, err_msg=f"array {j}")
            continue
        values = np.stack([np.asarray(s[j], np.float64) for s in states])
        largest = np.max(np.abs(values), axis=0)
        delta = np.max(np.abs(np.asarray(base[j], np.float64) - values), axis=0).astype(r.dtype)
        ulp = np.spacing(np.abs(r).astype(r.dtype)).astype(np.float64)
        bound = ulp + np.spacing(delta).astype(np.float64) / 2 + 4 * workers * 2.0 ** -53 * largest
        excess = np.abs(a.astype(np.float64) - r.astype(np.float64)) - bound
        assert np.all(excess <= 0), f"array {j}: off by more than the tolerance at " \
                                    f"{np.argwhere(excess > 0)[:5].tolist()}"


def tree_average(states, records, fan_in, shuffle_seed=None):
    """The executors' tree (same merge functions, same order rules) without Spark; with a
    shuffle seed the inputs of every merge arrive in a random order."""
    rng = random.Random(shuffle_seed)
    level_items = [(i, leaf(n, s, {"worker_index": i})) for i, (s, n) in enumerate(zip(states, records))]
    count, level = len(states), 0
    while count > 1:
        level += 1
        size = -(-count // fan_in)
        parts = {k: [] for k in range(size)}
        for position, partial in level_items:
            parts[position // fan_in].append((position // fan_in, (position, partial)))
        level_items = []
        for k in range(size):
            if shuffle_seed is not None:
                rng.shuffle(parts[k])
            level_items.extend(_merge_children(level, fan_in, count, parts[k]))
        count = size
    return finish(level_items[0][1])


def _random_states(rng, workers, cancel=False):
    base = [rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=13).astype(np.float32),
            np.array(100, np.int64), np.float32(0.05)]
    states = []
    for _ in range(workers):
        moved = [b + rng.normal(scale=1e-2, size=np.shape(b)).astype(np.float32) for b in base[:2]]
        if cancel:  # values of both signs whose weighted mean is near zero
            moved[1] = rng.choice([-1, 1], size=13).astype(np.float32) * np.float32(3.0)
        states.append(moved + [np.array(100 + int(rng.integers(1, 9)), np.int64), np.float32(0.05)])
    return base, states


@pytest.mark.parametrize("workers, fan_in", [(1, 8), (2, 2), (5, 2), (8, 8), (16, 4), (80, 5)])
def test_tree_average_equals_the_driver_average_within_the_stated_tolerance(workers, fan_in):
    rng = np.random.default_rng(workers)
    for cancel in (False, True):
        base, states = _random_states(rng, workers, cancel)
        records = [int(n) for n in rng.integers(1, 500, size=workers)]
        reference = average_states(base, states, records)
        tree = tree_average(states, records, fan_in)
        assert tree["records"] == sum(records)
        assert_within_tolerance(tree["arrays"], reference, base, states)
        assert int(tree["arrays"][2]) == max(int(s[2]) for s in states)  # counters: largest advance
        assert [r["worker_index"] for r in tree["reports"]] == list(range(workers))


def test_the_tolerance_check_can_fail():
    rng = np.random.default_rng(0)
    base, states = _random_states(rng, 4)
    reference = average_states(base, states, [1, 2, 3, 4])
    off = [np.nextafter(r, np.float32(np.inf)) if i == 0 else r for i, r in enumerate(reference)]
    assert_within_tolerance(off, reference, base, states)  # one ulp: inside
    two_off = [np.nextafter(o, np.float32(np.inf)) if i == 0 else o for i, o in enumerate(off)]
    with pytest.raises(AssertionError, match="tolerance"):
        assert_within_tolerance(two_off, reference, base, states)


def test_unweighted_or_unordered_merges_would_be_caught():
    """Record weighting matters here (a plain mean is far off), and the order inside a merge is
    fixed by position: shuffled arrivals give bit-identical results."""
    rng = np.random.default_rng(4)
    base, states = _random_states(rng, 11)
    records = [int(n) for n in rng.integers(1, 500, size=11)]
    ordered = tree_average(states, records, 3)
    for seed in range(5):
        shuffled = tree_average(states, records, 3, shuffle_seed=seed)
        for a, b in zip(shuffled["arrays"], ordered["arrays"]):
            np.testing.assert_array_equal(a, b)
    plain = average_states(base, states, [1] * 11)
    assert np.abs(plain[0] - ordered["arrays"][0]).max() > 1e-4


def test_workers_without_records_contribute_nothing_and_none_at_all_is_an_error():
    rng = np.random.default_rng(5)
    base, states = _random_states(rng, 3)
    states[1][0] = np.full_like(states[1][0], np.inf)  # would poison a 0 * w sum
    tree = tree_average(states, [10, 0, 30], 2)
    reference = average_states(base, states, [10, 0, 30])
    assert_within_tolerance(tree["arrays"], reference, base, [states[0], states[2]])
    assert int(tree["arrays"][2]) == max(int(s[2]) for s in states)  # still counted as stepping
    assert tree_average(states, [0, 0, 0], 2)["arrays"] is None


def test_tree_shape_bounds_every_merge_and_reaches_one_task():
    assert tree_shape(1) == (1, [])
    assert tree_shape(2) == (2, [1])
    assert tree_shape(8) == (8, [1])
    assert tree_shape(16) == (4, [4, 1])
    assert tree_shape(80) == (5, [16, 4, 1])
    for workers in range(2, 600, 7):
        fan_in, sizes = tree_shape(workers)
        assert 2 <= fan_in <= 8 and sizes[-1] == 1
        assert sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="max_fan_in"):
        tree_shape(4, 1)


def test_a_merge_missing_an_input_says_so():
    parts = [(0, (0, leaf(1, [np.ones(2, np.float32)], {"worker_index": 0})))]
    with pytest.raises(RuntimeError, match="not 1"):
        list(_merge_children(1, 2, 2, parts))
    merged = merge(None, leaf(2, [np.ones(2, np.float32)], {"worker_index": 0}))
    assert merged.records == 2 and merged.weighted


def test_rounds_on_spark_reduce_on_the_executors_like_the_driver_reference(spark, shards):
    """5 workers in a tree of fan-in 2 (three reduce levels) against the same round collected
    and averaged on the driver; the driver receives one state instead of five."""
    files = [shards["a"], shards["b"], shards["a"], shards["b"], shards["a"]]
    engine = SparkDataParallel(spark, tiny_model, momentum_sgd, COMPILE, tfrecord_dataset, 5,
                               shards=[[f] for f in files], max_fan_in=2)
    assert (engine.reduce_fan_in, engine.reduce_levels) == (2, [3, 2, 1])
    weights, opt = engine.initial_state()
    kwargs = dict(lr=0.05, steps=None, round_index=1, seed=8)
    tree = engine.run_round(weights, opt, **kwargs)
    reference, states, records = engine.reference_round(weights, opt, **kwargs)
    engine.close()
    assert records == [96, 32, 96, 32, 96] and tree.records == reference.records == 352
    assert_within_tolerance(tree.weights + tree.optimizer_state,
                            reference.weights + reference.optimizer_state, weights + opt, states)
    assert int(tree.optimizer_state[0]) == 6  # iterations: the longest worker's 6 steps
    assert not all(np.array_equal(a, b) for a, b in zip(tree.weights, weights))
    m, r = tree.metrics, reference.metrics
    assert [w["worker_index"] for w in m["workers"]] == list(range(5))
    assert m["loss"] == pytest.approx(r["loss"]) and m["reduce_levels"] == 3
    state_bytes = sum(a.nbytes for a in weights + opt)
    assert state_bytes <= m["driver_bytes_received"] < state_bytes + 5 * 4096
    assert r["driver_bytes_received"] >= 5 * state_bytes
    assert m["driver_peak_bytes"] > 0 and r["driver_peak_bytes"] > 0


def test_one_worker_finishes_inside_its_training_task(spark, shards):
    engine = _engine(spark, [[shards["b"]]], 1)
    weights, opt = engine.initial_state()
    result = engine.run_round(weights, opt, lr=0.05, steps=2, round_index=0, seed=1)
    reference, states, _ = engine.reference_round(weights, opt, lr=0.05, steps=2, round_index=0,
                                                  seed=1)
    engine.close()
    assert engine.reduce_levels == [] and result.metrics["reduce_levels"] == 0
    assert_within_tolerance(result.weights + result.optimizer_state,
                            reference.weights + reference.optimizer_state, weights + opt, states)


def test_driver_memory_check_refuses_what_cannot_fit_and_warns_when_tight(spark, caplog):
    sc = spark.sparkContext
    plan = driver_plan(sc, 1, 2)
    heap, copies = plan["heap_bytes"], plan["copies"]
    assert copies == 3 + 2 * min(2, sc.defaultParallelism)  # local mode: tasks share the JVM
    with pytest.raises(DriverMemoryError, match=r"spark.driver.memory to \d+m.*--driver-memory"):
        check(sc, heap // copies + 1, 2)
    with pytest.raises(DriverMemoryError, match=r"spark.driver.maxResultSize=1g: set it to"):
        check(sc, plan["max_result_size"] + 1, 2)
    caplog.clear()
    check(sc, (heap - 150 * 2**20) // copies, 2)
    assert "spark.driver.memory" in caplog.text
    caplog.clear()
    assert check(sc, 2**20, 2)["held_bytes"] == copies * 2**20
    assert caplog.text == ""
