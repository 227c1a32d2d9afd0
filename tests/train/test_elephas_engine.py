"""The `elephas` engine against plain single-process Keras, on real local Spark and real TFRecords.

Factories live at module level: executors import this module (the driver's cwd is on their path).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from train.elephas_engine import DISCOVERY_SCRIPT, SparkDataParallel, average_states, gpu_spark_conf, round_seed
from train.engines import ElephasEngine
from train.run import prepare_run
from train.settings import DenseSettings
from train.spark_worker import (
    RoundConfig,
    StateIO,
    WorkerSpec,
    _remember_stream,
    _stream,
    build_compiled,
    load_state,
    visible_devices_for_task,
)

FEATURES, CLASSES, BATCH = 8, 3, 16
COMPILE = {"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}


def tiny_model():
    import keras

    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(hidden))


def momentum_sgd():
    import keras

    return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)


def scheduled_sgd():
    import keras

    return keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))


def _parse(serialized):
    import tensorflow as tf

    parsed = tf.io.parse_single_example(serialized, {
        "x": tf.io.FixedLenFeature([FEATURES], tf.float32),
        "y": tf.io.FixedLenFeature([], tf.int64)})
    return parsed["x"], parsed["y"]


def tfrecord_dataset(shard_files, worker_index, num_workers, seed):
    """A streaming pipeline like train.data's: read, parse, seeded shuffle, batch."""
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(list(shard_files)).map(_parse)
    return ds.shuffle(256, seed=seed).batch(BATCH)


def _write_shard(path: Path, records: int, rng: np.random.Generator) -> str:
    import tensorflow as tf

    centres = rng.normal(size=(CLASSES, FEATURES)) * 2
    with tf.io.TFRecordWriter(str(path)) as writer:
        for _ in range(records):
            y = int(rng.integers(CLASSES))
            x = centres[y] + rng.normal(size=FEATURES)
            example = tf.train.Example(features=tf.train.Features(feature={
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=x.tolist())),
                "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[y]))}))
            writer.write(example.SerializeToString())
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    return {"a": _write_shard(root / "a.tfrecord", 96, rng),
            "b": _write_shard(root / "b.tfrecord", 32, rng)}


def _engine(spark, shard_lists, workers, **kwargs):
    return SparkDataParallel(spark, tiny_model, momentum_sgd, COMPILE, tfrecord_dataset, workers,
                             shards=shard_lists, **kwargs)


def _local_fit(weights, optimizer_state, dataset, batches: int):
    """Plain single-process Keras: model.fit over the same tf.data batches."""
    import tensorflow as tf

    model = build_compiled(WorkerSpec(tiny_model, momentum_sgd, COMPILE, tfrecord_dataset, 1))
    load_state(model, weights, optimizer_state)
    # Keras 3 fit() over a dataset of unknown length counts one optimizer iteration too many per
    # epoch (the step that hits the end of data); declaring the length keeps the count exact.
    model.fit(dataset.apply(tf.data.experimental.assert_cardinality(batches)), epochs=1, verbose=0)
    return model.get_weights(), [v.numpy() for v in model.optimizer.variables]


def _local_dataset(shard_files, seed):
    import keras

    keras.utils.set_random_seed(seed)  # the engine's convention (train.spark_worker.make_worker_dataset)
    return tfrecord_dataset(shard_files, 0, 1, seed)


def _close(actual, expected, atol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=atol)


def test_one_worker_one_round_equals_single_process_fit(spark, shards):
    engine = _engine(spark, [[shards["a"]]], 1)
    weights, opt = engine.initial_state()
    result = engine.run_round(weights, opt, lr=0.05, steps=None, round_index=3, seed=11)

    local_w, local_opt = _local_fit(weights, opt, _local_dataset([shards["a"]], round_seed(11, 3)), 6)
    _close(result.weights, local_w)
    _close(result.optimizer_state, local_opt)
    assert result.records == 96 and result.metrics["steps"] == 6
    assert int(result.optimizer_state[0]) == 6  # iterations
    assert not all(np.allclose(a, b) for a, b in zip(result.weights, weights))  # it trained
    assert 0.0 < result.metrics["loss"] < 10 and 0.0 <= result.metrics["accuracy"] <= 1.0
    # CPU path: no Spark GPU resources, so the task leaves CUDA_VISIBLE_DEVICES untouched.
    report = result.metrics["workers"][0]
    assert report["gpu_assigned"] is None
    assert report["gpu_visible"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    engine.close()


def test_n_workers_on_identical_partitions_give_the_single_worker_result(spark, shards):
    one = _engine(spark, [[shards["a"]]], 1)
    weights, opt = one.initial_state()
    single = one.run_round(weights, opt, lr=0.05, steps=4, round_index=0, seed=5)
    two = _engine(spark, [[shards["a"]], [shards["a"]]], 2)
    double = two.run_round(weights, opt, lr=0.05, steps=4, round_index=0, seed=5)
    _close(double.weights, single.weights, atol=1e-6)
    _close(double.optimizer_state, single.optimizer_state, atol=1e-6)
    assert double.records == 2 * single.records == 2 * 4 * BATCH
    assert int(double.optimizer_state[0]) == 4  # parallel steps are not added up
    one.close(), two.close()


def test_optimizer_state_survives_rounds_like_one_process(spark, shards):
    """Two K-step rounds (momentum SGD) == one process training 2K steps on the same stream."""
    engine = _engine(spark, [[shards["a"]]], 1, averaging_steps=4)
    weights, opt = engine.initial_state()
    first = engine.run_round(weights, opt, lr=0.05, steps=None, round_index=0, seed=2)
    second = engine.run_round(first.weights, first.optimizer_state, lr=0.05, steps=None,
                              round_index=1, seed=2)
    # 8 steps cross the end of the 6-batch shard: the stream repeats, reshuffled.
    local_w, local_opt = _local_fit(weights, opt, _local_dataset([shards["a"]], 2).repeat().take(8), 8)
    _close(second.weights, local_w)
    _close(second.optimizer_state, local_opt)
    assert int(first.optimizer_state[0]) == 4 and int(second.optimizer_state[0]) == 8
    assert any(np.abs(m).sum() > 0 for m in second.optimizer_state[2:])  # momentum is shipped

    # Sensitivity: restarting the optimizer (stock elephas) gives other weights.
    reset = engine.run_round(first.weights, None, lr=0.05, steps=None, round_index=1, seed=2)
    assert int(reset.optimizer_state[0]) == 4
    assert max(np.abs(a - b).max() for a, b in zip(reset.weights, second.weights)) > 1e-4
    engine.close()


def test_deltas_are_weighted_by_records(spark, shards):
    """Unequal partitions (96 vs 32 records): the 96-record worker pulls three times as hard."""
    engine = _engine(spark, [[shards["a"]], [shards["b"]]], 2)
    weights, opt = engine.initial_state()
    result = engine.run_round(weights, opt, lr=0.05, steps=None, round_index=0, seed=7)

    data_seed = round_seed(7, 0)
    wa, oa = _local_fit(weights, opt, _local_dataset([shards["a"]], data_seed), 6)
    wb, ob = _local_fit(weights, opt, _local_dataset([shards["b"]], data_seed), 2)
    expected = [w0 + 0.75 * (a - w0) + 0.25 * (b - w0) for w0, a, b in zip(weights, wa, wb)]
    _close(result.weights, expected)
    unweighted = [w0 + 0.5 * (a - w0) + 0.5 * (b - w0) for w0, a, b in zip(weights, wa, wb)]
    assert max(np.abs(r - u).max() for r, u in zip(result.weights, unweighted)) > 1e-4
    assert result.records == 128
    assert [w["records"] for w in result.metrics["workers"]] == [96, 32]
    assert int(result.optimizer_state[0]) == 6  # the longer worker's 6 steps, not 6 + 2
    engine.close()


def test_model_built_once_per_python_worker_and_fixed_cost_reported(spark, shards):
    engine = _engine(spark, [[shards["a"]], [shards["b"]]], 2, averaging_steps=2,
                     model_key=f"build-count-{uuid.uuid4().hex}")
    weights, opt = engine.initial_state()
    builds_by_pid: dict[int, set[int]] = {}
    built_per_round = []
    for r in range(3):
        result = engine.run_round(weights, opt, lr=0.05, steps=None, round_index=r, seed=1)
        weights, opt = result.weights, result.optimizer_state
        built_per_round.append(result.metrics["model_builds"])
        for report in result.metrics["workers"]:
            builds_by_pid.setdefault(report["pid"], set()).add(report["builds"])
            assert report["pid"] != os.getpid()  # trained on executors, not in the driver
        m = result.metrics
        assert m["round_s"] >= m["train_s"] > 0 and m["fixed_cost_s"] >= 0
        assert m["fixed_cost_s"] == pytest.approx(m["round_s"] - m["train_s"])
        assert all(w["setup_s"] >= 0 and w["train_s"] > 0 for w in m["workers"])
    # Each Python worker built this model exactly once, however many rounds it served.
    assert all(counts == {1} for counts in builds_by_pid.values())
    assert sum(built_per_round) == len(builds_by_pid) and built_per_round[-1] == 0
    assert int(opt[0]) == 6
    engine.close()


def test_learning_rate_comes_from_the_driver(spark, shards):
    """The driver's schedule sets lr per round: lr=0 leaves weights alone while steps still count."""
    engine = _engine(spark, [[shards["b"]]], 1)
    weights, opt = engine.initial_state()
    frozen = engine.run_round(weights, opt, lr=0.0, steps=2, round_index=0, seed=3)
    _close(frozen.weights, weights, atol=0)
    assert int(frozen.optimizer_state[0]) == 2
    assert float(frozen.optimizer_state[1]) == 0.0  # the learning-rate variable travelled
    moved = engine.run_round(weights, opt, lr=0.5, steps=2, round_index=0, seed=3)
    assert float(moved.optimizer_state[1]) == pytest.approx(0.5)
    assert max(np.abs(a - b).max() for a, b in zip(moved.weights, weights)) > 1e-3
    engine.close()


def test_k_step_rounds_continue_through_the_data(spark, shards):
    """Round r of K steps reads stream steps [rK, (r+1)K): a resumed engine gets the same result."""
    engine = _engine(spark, [[shards["a"]]], 1, averaging_steps=3)
    weights, opt = engine.initial_state()
    r0 = engine.run_round(weights, opt, lr=0.05, steps=None, round_index=0, seed=9)
    r1 = engine.run_round(r0.weights, r0.optimizer_state, lr=0.05, steps=None, round_index=1, seed=9)
    engine.close()
    # A fresh engine starting at round 1 must agree. Its factory is a distinct (equivalent) object,
    # so no Python worker holds a cached stream for it: it must rebuild the stream and skip ahead.
    resumed = SparkDataParallel(spark, tiny_model, momentum_sgd, COMPILE,
                                functools.partial(tfrecord_dataset), 1, averaging_steps=3,
                                shards=[[shards["a"]]])
    again = resumed.run_round(r0.weights, r0.optimizer_state, lr=0.05, steps=None, round_index=1,
                              seed=9)
    _close(again.weights, r1.weights, atol=1e-6)
    assert again.metrics["workers"][0]["skipped_steps"] == 3  # rebuilt its stream and skipped ahead
    # Replaying round 0's data instead would give something else.
    replay = resumed.run_round(r0.weights, r0.optimizer_state, lr=0.05, steps=3, round_index=1,
                               seed=9, start_step=0)
    assert max(np.abs(a - b).max() for a, b in zip(replay.weights, r1.weights)) > 1e-5
    resumed.close()


def test_average_states_weights_floats_and_advances_counters():
    base = [np.zeros(2, np.float32), np.array(10, np.int64)]
    states = [[np.array([4.0, 0.0], np.float32), np.array(13, np.int64)],
              [np.array([0.0, 8.0], np.float32), np.array(12, np.int64)]]
    merged = average_states(base, states, [3, 1])
    np.testing.assert_allclose(merged[0], [3.0, 2.0])
    assert merged[0].dtype == np.float32 and int(merged[1]) == 13
    with pytest.raises(ValueError, match="no worker trained"):
        average_states(base, states, [0, 0])


def test_bad_arguments_are_named(spark, shards):
    with pytest.raises(ValueError, match="workers"):
        _engine(spark, [shards["a"]], 0)
    with pytest.raises(ValueError, match="shards"):
        _engine(spark, [shards["a"]], 2)  # one shard file cannot feed two workers
    with pytest.raises(ValueError, match="averaging_steps"):
        _engine(spark, [shards["a"]], 1, averaging_steps=0)
    with pytest.raises(ValueError, match="gpus_per_task"):
        _engine(spark, [shards["a"]], 1, gpus_per_task=1)  # no spark.task.resource.gpu.amount
    engine = _engine(spark, [shards["a"], shards["b"]], 2)
    assert engine.shard_lists == [[shards["a"]], [shards["b"]]]
    with pytest.raises(ValueError, match="lr"):
        engine.run_round([], None, lr=float("nan"), steps=1, round_index=0, seed=0)
    with pytest.raises(ValueError, match="start_step"):
        engine.run_round([], None, lr=0.1, steps=None, round_index=0, seed=0, start_step=2)
    engine.close()
    scheduled = SparkDataParallel(spark, tiny_model, scheduled_sgd, COMPILE, tfrecord_dataset, 1,
                                  shards=[shards["a"]])
    with pytest.raises(ValueError, match="lr: the optimizer has a learning-rate schedule"):
        scheduled.run_round([], None, lr=0.1, steps=1, round_index=0, seed=0)
    scheduled.close()


def test_gpu_addresses_become_visible_devices():
    assert visible_devices_for_task([], 0) is None
    assert visible_devices_for_task(["2"], 1) == "2"
    with pytest.raises(RuntimeError, match="spark.task.resource.gpu.amount"):
        visible_devices_for_task([], 1)


def _discover(env_overrides: dict, path_prefix: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(env_overrides)
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    out = subprocess.run([str(DISCOVERY_SCRIPT)], env=env, capture_output=True, text=True, check=True,
                         timeout=30).stdout
    return json.loads(out)


def test_gpu_discovery_script(tmp_path):
    assert os.access(DISCOVERY_SCRIPT, os.X_OK), "Spark runs the discovery script directly"
    # This host: no GPU, so a valid resource with no addresses.
    no_gpu = _discover({}, path_prefix=str(tmp_path))  # tmp_path holds no nvidia-smi
    if not any((Path(p) / "nvidia-smi").exists() for p in os.environ["PATH"].split(":")):
        assert no_gpu == {"name": "gpu", "addresses": []}
    assert _discover({"CUDA_VISIBLE_DEVICES": ""}) == {"name": "gpu", "addresses": []}
    # A SLURM allocation restricts the devices; junk values are not addresses.
    assert _discover({"CUDA_VISIBLE_DEVICES": "2,3"})["addresses"] == ["2", "3"]
    assert _discover({"CUDA_VISIBLE_DEVICES": "NoDevFiles"})["addresses"] == []
    # A 4-GPU node without an allocation: the script lists what nvidia-smi lists.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n3\\n'\n")
    fake.chmod(0o755)
    assert _discover({}, path_prefix=str(tmp_path))["addresses"] == ["0", "1", "2", "3"]


def test_gpu_spark_conf_points_at_the_discovery_script():
    conf = gpu_spark_conf()
    assert conf["spark.executor.resource.gpu.amount"] == "4"
    assert conf["spark.task.resource.gpu.amount"] == "1"
    assert Path(conf["spark.executor.resource.gpu.discoveryScript"]) == DISCOVERY_SCRIPT
    with pytest.raises(ValueError):
        gpu_spark_conf(gpus_per_executor=0)


def test_workers_reuse_their_stream_across_rounds_and_rebuild_when_its_key_changes(spark, shards):
    engine = _engine(spark, [[shards["a"]]], 1, averaging_steps=2,
                     model_key=f"stream-reuse-{uuid.uuid4().hex}")
    weights, opt = engine.initial_state()
    built_by_pid: dict[int, list[bool]] = {}
    states = [(weights, opt)]
    for r in range(4):
        result = engine.run_round(*states[-1], lr=0.05, steps=None, round_index=r, seed=4)
        report = result.metrics["workers"][0]
        built_by_pid.setdefault(report["pid"], []).append(report["pipeline_built"])
        states.append((result.weights, result.optimizer_state))
    # Each Python worker built the stream the first time it served this worker, then reused it
    # (catching up if another Python worker served the rounds in between).
    assert all(built[0] and not any(built[1:]) for built in built_by_pid.values())
    assert sum(b for built in built_by_pid.values() for b in built) == len(built_by_pid) < 4

    # Equal to a fresh build: a new factory object (so nothing cached) starting at round 3.
    fresh = SparkDataParallel(spark, tiny_model, momentum_sgd, COMPILE,
                              functools.partial(tfrecord_dataset), 1, averaging_steps=2,
                              shards=[[shards["a"]]])
    again = fresh.run_round(*states[3], lr=0.05, steps=None, round_index=3, seed=4)
    assert again.metrics["workers"][0]["pipeline_built"]
    _close(again.weights, states[4][0], atol=1e-6)
    fresh.close()

    # What determines the stream changed (the seed): rebuilt, not reused.
    other = engine.run_round(*states[4], lr=0.05, steps=None, round_index=4, seed=40)
    assert other.metrics["workers"][0]["pipeline_built"]
    engine.close()


def test_a_stream_behind_the_requested_step_catches_up_by_the_gap(tmp_path):
    """A cached stream another Python worker fell behind on is advanced, not rebuilt: the same
    batches as a stream built fresh at that step."""
    shard = _write_shard(tmp_path / "c.tfrecord", 64, np.random.default_rng(1))
    spec = WorkerSpec(tiny_model, momentum_sgd, COMPILE, tfrecord_dataset, 1)
    data_key = f"catch-up-{uuid.uuid4().hex}"

    def cfg(start, key=data_key):
        return RoundConfig(model_key="unused", data_key=key, lr=None, steps=2, start_step=start,
                           round_index=0, seed=6, run_seed=6, n_weights=0)

    key, stream, skipped, built = _stream(spec, cfg(0), 0, [shard])
    assert built and skipped == 0
    next(stream.iterator), next(stream.iterator)
    stream.position = 2
    _remember_stream(key, stream)
    _, behind, skipped, built = _stream(spec, cfg(5), 0, [shard])
    assert not built and skipped == 3 and behind.position == 5

    _, fresh, skipped, built = _stream(spec, cfg(5, key=data_key + "-fresh"), 0, [shard])
    assert built and skipped == 5
    for _ in range(3):  # 4 batches a pass: this crosses into the next, reshuffled pass
        np.testing.assert_array_equal(next(behind.iterator)[0].numpy(),
                                      next(fresh.iterator)[0].numpy())


def test_state_io_sets_and_reads_every_weight_and_optimizer_variable_at_once():
    model = build_compiled(WorkerSpec(tiny_model, momentum_sgd, COMPILE, tfrecord_dataset, 1))
    io = StateIO(model)
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()]
    # elephas' wire format turns 0-d arrays (iterations, learning rate) into shape (1,)
    opt = [np.reshape(np.asarray(v.numpy()) + 7, (1,) if not v.shape else v.shape)
           for v in model.optimizer.variables]
    io.load(weights, opt)
    _close(model.get_weights(), weights, atol=0)
    assert int(model.optimizer.iterations.numpy()) == 7
    back = io.read()
    assert len(back) == len(weights) + len(opt)
    _close(back[:len(weights)], weights, atol=0)
    assert back[len(weights)].shape == () and int(back[len(weights)]) == 7
    with pytest.raises(ValueError, match="weights: got"):
        io.load(weights[:-1], opt)
    with pytest.raises(ValueError, match=r"optimizer_state\[2\]: expected shape"):
        io.load(weights, opt[:2] + [np.zeros(3, np.float32)] + opt[3:])


def test_driver_ships_and_takes_back_the_whole_state_in_one_call_per_direction(digits_dir, spark,
                                                                              tmp_path):
    """train.engines.ElephasEngine reads and sets weights and optimizer variables with StateIO: what
    it ships must be exactly the model's state, and after a round the model must hold exactly the
    averaged result (order, shapes and 0-d counters included), round after round."""
    prepared = prepare_run(DenseSettings(
        data=str(digits_dir), out=str(tmp_path), model="conv_small",
        model_options={"blocks": 1, "width": 0.125, "dense": 16}, engine="elephas", workers=1,
        epochs=2, batch_size=64, lr=0.05, augment="none"))
    engine = ElephasEngine(prepared.settings, prepared.info, spark=spark)
    model, shipped, results = engine.model, [], []
    run_round = engine.dp.run_round

    def recording(weights, optimizer_state, **kwargs):  # a pass-through spy, not a stand-in
        shipped.append(([np.array(w) for w in weights], [np.array(v) for v in optimizer_state]))
        results.append(run_round(weights, optimizer_state, **kwargs))
        return results[-1]

    engine.dp.run_round = recording

    def state():
        return model.get_weights(), [np.array(v.numpy()) for v in model.optimizer.variables]

    try:
        for epoch in range(2):
            before_w, before_opt = state()
            engine.train_epoch(epoch, 0.05)
            sent_w, sent_opt = shipped[-1]
            for a, e in zip(sent_w + sent_opt, before_w + before_opt):
                np.testing.assert_array_equal(np.reshape(a, np.shape(e)), e)
            assert len(sent_w) == len(before_w) and len(sent_opt) == len(before_opt)
            after_w, after_opt = state()
            for a, e in zip(after_w + after_opt, results[-1].weights + results[-1].optimizer_state):
                np.testing.assert_array_equal(a, np.reshape(e, np.shape(a)))
            assert int(after_opt[0]) == (epoch + 1) * engine.steps_per_epoch  # iterations
            assert any(not np.array_equal(a, b) for a, b in zip(after_w, before_w))  # it trained
            assert any(not np.array_equal(a, b) for a, b in zip(after_opt[1:], before_opt[1:]))
    finally:
        engine.close()
