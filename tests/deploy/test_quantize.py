"""bigticket quantize on real models: a LeNet-300-100 trained on the digits fixture, converted to
every LiteRT variant and evaluated through the interpreter; a 90%-pruned grid point; re-runs; the
builtin-only check; mixed precision; the command's errors."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from common.atomic import write_json
from common.paths import GridPaths, QuantizedPaths

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")]

# The digits validation split has ~360 images: one image is 0.28 points.
ACCURACY_TOLERANCE = 0.02
FAST = dict(seconds=0.2, representative=64)


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
    from train.run import train_dense
    from train.settings import DenseSettings

    run = train_dense(DenseSettings(data=str(digits_dir), model="lenet_300_100", epochs=3,
                                    batch_size=64, lr=0.05, augment="none",
                                    out=str(tmp_path_factory.mktemp("runs"))))
    return run


@pytest.fixture(scope="module")
def quantized(trained):
    from deploy.quantize import Options, quantize_target
    from deploy.targets import run_target

    target = run_target(trained.root)
    return target, quantize_target(target, Options(**FAST))


def test_every_variant_is_smaller_as_promised_and_as_accurate_as_keras(quantized):
    target, record = quantized
    variants = record["variants"]
    assert set(variants) == {"float32", "float16", "dynamic_int8", "full_int8"}
    assert target.paths == QuantizedPaths(target.run.root)
    on_disk = json.loads(target.paths.results.read_text())
    assert on_disk["variants"].keys() == variants.keys()
    f32 = variants["float32"]["bytes"]
    assert variants["float16"]["bytes"] <= 0.52 * f32
    assert variants["dynamic_int8"]["bytes"] <= 0.32 * f32
    assert variants["full_int8"]["bytes"] <= 0.32 * f32
    keras_accuracy = record["keras"]["accuracy"]
    assert keras_accuracy > 0.8   # a trained network, or the comparison says nothing
    for name, entry in variants.items():
        assert target.paths.model(name).stat().st_size == entry["bytes"]
        assert entry["gzip_bytes"] < entry["bytes"] * 1.01
        assert abs(entry["accuracy"] - keras_accuracy) <= ACCURACY_TOLERANCE, name
        assert 0 <= entry["top5_accuracy"] <= 1 and entry["top5_accuracy"] >= entry["accuracy"]
        assert entry["builtin_only"] and "FULLY_CONNECTED" in entry["operators"]
        assert entry["images_per_s"] > 0 and entry["threads"] == 1
        assert entry["eval_records"] == record["dataset"]["validation_records"]
    assert "QUANTIZE" in variants["full_int8"]["operators"]     # activations really int8
    assert record["model"]["params"] == 16 * 16 * 3 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_a_rerun_loads_nothing_and_rewrites_nothing(quantized):
    from deploy.quantize import Options, quantize_target

    target, record = quantized
    stamps = {p.name: p.stat().st_mtime_ns for p in target.paths.root.iterdir()}

    def refuse():
        raise AssertionError("a finished target must not load its model again")

    again = quantize_target(dataclasses.replace(target, load=refuse), Options(**FAST))
    assert again == record
    assert {p.name: p.stat().st_mtime_ns for p in target.paths.root.iterdir()} == stamps


def test_int8_io_redoes_only_full_int8_and_feeds_int8(quantized):
    from deploy.measure import LiteRTRunner
    from deploy.quantize import Options, quantize_target

    target, record = quantized
    before = {n: target.paths.model(n).stat().st_mtime_ns for n in record["variants"]}
    redone = quantize_target(target, Options(**FAST, int8_io=True))
    after = {n: target.paths.model(n).stat().st_mtime_ns for n in record["variants"]}
    assert [n for n in after if after[n] != before[n]] == ["full_int8"]
    assert redone["variants"]["full_int8"]["options"]["int8_io"] is True
    runner = LiteRTRunner(target.paths.model("full_int8").read_bytes(), batch=4)
    assert runner.input["dtype"] == np.int8 and runner.output["dtype"] == np.int8
    assert abs(redone["variants"]["full_int8"]["accuracy"] - redone["keras"]["accuracy"]) <= ACCURACY_TOLERANCE


def _prune(model, sparsity: float):
    """Zero the smallest `sparsity` of every kernel, as a magnitude ticket is (exact zeros)."""
    for layer in model.layers:
        if getattr(layer, "kernel", None) is not None:
            w = np.array(layer.kernel)
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
            layer.kernel.assign(w)
    return model


@pytest.fixture(scope="module")
def pruned_point(trained):
    """A finished one-shot point of a grid, written as the runner leaves it: its result file and
    its network (models/<task_id>.keras, lottery.points.point_weights) at 90% sparsity."""
    from lottery.points.point_weights import save_point_weights
    from train.checkpoints import load_checkpoint

    grid = GridPaths(trained.root / "lottery-test")
    write_json(grid.settings, {"schema_version": 1, "kind": "lottery-grid", "tasks": []})
    model = _prune(load_checkpoint(trained.root, "final"), 0.9)
    for task_id in ("oneshot-p90", "oneshot-old"):
        write_json(grid.result(task_id), {"task_id": task_id, "task": {"kind": "oneshot"},
                                          "result": {"kind": "oneshot", "sparsity": 0.9}})
    save_point_weights(grid.root, "oneshot-p90", model)   # oneshot-old: finished before models were kept
    return grid


def test_a_pruned_point_compresses_and_sparse_storage_saves_bytes(pruned_point, quantized, capsys):
    from bigticket.cli import main

    status = main(["quantize", "--grid", str(pruned_point.root), "--point", "oneshot-p90",
                   "--variants", "float32,dynamic_int8", "--sparse", "--seconds", "0.2"])
    assert status == 0
    paths = QuantizedPaths.for_point(pruned_point, "oneshot-p90")
    assert capsys.readouterr().out.split() == [str(paths.results)]
    record = json.loads(paths.results.read_text())
    assert record["model"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    variants = record["variants"]
    assert set(variants) == {"float32", "dynamic_int8", "float32_sparse", "dynamic_int8_sparse"}
    dense_f32_gzip = quantized[1]["variants"]["float32"]["gzip_bytes"]
    assert variants["dynamic_int8"]["gzip_bytes"] <= 0.25 * dense_f32_gzip
    assert variants["float32_sparse"]["bytes"] < 0.5 * variants["float32"]["bytes"]
    for entry in variants.values():
        assert abs(entry["accuracy"] - record["keras"]["accuracy"]) <= ACCURACY_TOLERANCE


def test_a_whole_grid_names_the_points_it_could_not_export(pruned_point, capsys):
    from bigticket.cli import main

    status = main(["quantize", "--grid", str(pruned_point.root), "--variants", "float32",
                   "--seconds", "0.1"])
    captured = capsys.readouterr()
    assert status == 1
    assert "kept no trained network" in captured.err and "oneshot-old" in captured.err
    assert str(QuantizedPaths.for_point(pruned_point, "oneshot-p90").results) in captured.out


@pytest.mark.parametrize("argv, message", [
    (["--variants", "float32"], r"--run / --grid: give exactly one"),
    (["--run", "RUN", "--grid", "GRID"], r"--run / --grid: give exactly one"),
    (["--run", "RUN", "--point", "x"], r"--point: needs --grid"),
    (["--grid", "GRID", "--label", "init"], r"--label: only with --run"),
    (["--run", "RUN", "--variants", "int4"], r"--variants: unknown variant 'int4'"),
    (["--run", "RUN", "--representative", "0"], r"--representative: must be >= 1"),
    (["--run", "RUN", "--label", "9ep"], r"--label: run dense-\w+ has no checkpoint '9ep' \(has: final, init\)"),
    (["--grid", "GRID", "--point", "nope"], r"--point: 'nope' has no result"),
    (["--run", "NOWHERE"], r"--run \S+: not a dense run directory"),
])
def test_bad_input_is_one_error_naming_the_flag(trained, pruned_point, capsys, argv, message):
    from bigticket.cli import main

    argv = [{"RUN": str(trained.root), "GRID": str(pruned_point.root),
             "NOWHERE": str(trained.root / "nowhere")}.get(a, a) for a in argv]
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigticket quantize: error: ")
    import re
    assert re.search(message, err), err


def test_a_flex_op_is_refused_at_conversion_and_in_a_file():
    import keras
    import tensorflow as tf

    from deploy.litert import FlexOpError, check_builtin_only, convert

    class Determinant(keras.layers.Layer):   # tf.linalg.det has no LiteRT builtin kernel
        def call(self, x):
            return tf.linalg.det(tf.reshape(x[:, :4], [-1, 2, 2]))[:, None] + x

    inputs = keras.Input((8,))
    model = keras.Model(inputs, Determinant()(inputs), name="det")
    with pytest.raises(FlexOpError, match=r"model 'det', variant float32: .*Flex ops: MatrixDeterminant"):
        convert(model, "float32")
    # The same model converted elsewhere with TF Select: the file itself is refused.
    fn = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    with pytest.raises(FlexOpError, match=r"FlexMatrixDeterminant"):
        check_builtin_only(converter.convert(), "det.tflite")


def test_a_mixed_precision_model_is_rebuilt_in_float32_before_export(trained):
    import keras

    from deploy.litert import as_float32, convert, is_mixed_precision
    from deploy.measure import LiteRTRunner
    from train.checkpoints import load_checkpoint

    reference = load_checkpoint(trained.root, "final")
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = load_checkpoint(trained.root, "final")
    finally:
        keras.config.set_dtype_policy("float32")
    assert is_mixed_precision(mixed)
    rebuilt = as_float32(mixed)
    assert not is_mixed_precision(rebuilt) and rebuilt is not mixed
    assert all(w.dtype == np.float32 for w in rebuilt.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (16, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(rebuilt.predict_on_batch(x), reference.predict_on_batch(x), atol=1e-5)
    litert = LiteRTRunner(convert(rebuilt, "float32"), batch=16).predict(x)
    np.testing.assert_allclose(litert, reference.predict_on_batch(x), atol=1e-4)
    assert as_float32(reference) is reference


def test_the_report_section_compares_dense_gmp_ticket_and_gmp_int8(quantized, pruned_point, capsys):
    """lottery.report.compression on the files quantize wrote: the dense run, the 90% ticket and a
    GMP point (a point of kind gmp, here a 70%-pruned network saved as its runner saves it)."""
    from bigticket.cli import main
    from lottery.points.point_weights import save_point_weights
    from lottery.report.compression import comparison_rows, compression_section, quantized_targets
    from train.checkpoints import load_checkpoint

    grid = pruned_point
    write_json(grid.result("gmp-s7000"), {"task_id": "gmp-s7000", "task": {"kind": "gmp"},
                                          "result": {"kind": "gmp", "sparsity": 0.7}})
    save_point_weights(grid.root, "gmp-s7000", _prune(load_checkpoint(grid.root.parent, "final"), 0.7))
    assert main(["quantize", "--grid", str(grid.root), "--point", "gmp-s7000", "--variants",
                 "float32,full_int8", "--seconds", "0.1"]) == 0
    # The ticket's export, whichever test ran first (resumable: a no-op when it already exists);
    # under pytest-xdist this test may run without the others of this file.
    assert main(["quantize", "--grid", str(grid.root), "--point", "oneshot-p90", "--variants",
                 "float32", "--seconds", "0.1"]) == 0
    capsys.readouterr()
    records = [json.loads(p.read_text()) for p in sorted(grid.results.glob("*.json"))]
    targets = quantized_targets(grid, records)
    assert {t["family"] for t in targets} == {"dense", "ticket", "gmp"}
    rows = comparison_rows(targets)
    assert [(r["row"], r["source"], r["variant"]) for r in rows] == [
        ("dense", grid.root.parent.name, "float32"), ("GMP", "gmp-s7000", "float32"),
        ("lottery ticket", "oneshot-p90", "float32"), ("GMP + int8", "gmp-s7000", "full_int8")]
    gmp_record = json.loads(QuantizedPaths.for_point(grid, "gmp-s7000").results.read_text())
    assert rows[3]["gzip_bytes"] == gmp_record["variants"]["full_int8"]["gzip_bytes"] < rows[1]["gzip_bytes"]
    assert rows[0]["nonzeros"] > rows[1]["nonzeros"] > rows[2]["nonzeros"]
    parts, plots, table = compression_section(grid, records)
    assert table.count("\n") == 2 + 4 and "| GMP + int8 | `gmp-s7000` | full_int8 |" in table
    assert parts[0].startswith("## Compression") and plots[0][0].stat().st_size > 1000
