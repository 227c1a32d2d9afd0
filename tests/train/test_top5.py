"""Top-5 accuracy in dense histories (local and elephas engines), beside top-1 and loss."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from train.data import make_dataset
from train.metrics import TOP5, compile_metrics, has_top5, top5_correct
from train.run import train_dense
from train.settings import DenseSettings

TINY = {"blocks": 1, "width": 0.125, "dense": 16}


def _rows(run):
    return list(csv.DictReader(run.history.open()))


def _top5_of(model, data) -> float:
    hits = count = 0
    for x, y in data:
        probs = model.predict_on_batch(x)
        top = np.argsort(-probs, axis=1)[:, :5]
        hits += int(np.sum(top == np.asarray(y)[:, None]))
        count += len(y)
    return hits / count


def test_top5_is_compiled_only_where_it_means_something():
    assert [has_top5(n) for n in (None, 2, 5, 6, 1000)] == [False, False, False, True, True]
    assert compile_metrics(5) == ["accuracy"]
    (top1, top5) = compile_metrics(10)
    assert top1 == "accuracy" and top5.name == TOP5
    # The multiworker loop's own count agrees with a NumPy one.
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=50).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 10, 50)
    expected = np.sum(np.any(np.argsort(-probs, axis=1)[:, :5] == labels[:, None], axis=1))
    assert float(top5_correct(probs, labels)) == expected


def test_local_history_has_top1_top5_and_loss(digits_dir, digits, tmp_path):
    import keras

    settings = DenseSettings(data=str(digits_dir), out=str(tmp_path), model="conv_small",
                             model_options=TINY, epochs=2, batch_size=64, augment="none")
    run = train_dense(settings)
    rows = _rows(run)
    assert len(rows) == 2
    for row in rows:
        for key in ("loss", "accuracy", TOP5, "val_loss", "val_accuracy", f"val_{TOP5}"):
            assert 0 <= float(row[key]) < 10, key
        assert float(row[f"val_{TOP5}"]) >= float(row["val_accuracy"])
        assert float(row[TOP5]) >= float(row["accuracy"])
        assert float(row["val_at_chance"]) == 0.0   # a healthy run is not flagged
    # The recorded top-5 is the fraction of validation images whose label is among the 5 most
    # probable classes of the final model.
    model = keras.saving.load_model(str(run.model), safe_mode=True)
    val = make_dataset(digits, "validation", batch_size=64, training=False, input_size=16)
    assert float(rows[-1][f"val_{TOP5}"]) == pytest.approx(_top5_of(model, val), abs=1e-6)
    assert float(rows[-1][f"val_{TOP5}"]) > float(rows[-1]["val_accuracy"])
    record = json.loads(run.settings.read_text())
    assert record["bn_momentum"] is None   # conv_small has no BatchNorm


@pytest.mark.slow
def test_elephas_history_has_top5_and_recalibrates_averaged_batchnorm(digits_dir, spark, tmp_path):
    """Two Elephas workers (local[2]) training a BatchNorm model: auto recalibration is on (the
    averaged statistics belong to no worker) and the history records it beside top-5."""
    settings = DenseSettings(data=str(digits_dir), out=str(tmp_path), model="resnet20",
                             model_options={"width": 2}, engine="elephas", workers=2, epochs=1,
                             batch_size=64, augment="none", optimizer="adam", lr=0.01)
    run = train_dense(settings, spark=spark)
    (row,) = _rows(run)
    assert 0 < float(row[TOP5]) <= 1 and float(row[TOP5]) >= float(row["accuracy"])
    assert float(row[f"val_{TOP5}"]) >= float(row["val_accuracy"])
    assert float(row["bn_recalibrated"]) == 1.0
    assert 0 <= float(row["val_accuracy_before_bn_recalibration"]) <= 1
    record = json.loads(run.settings.read_text())
    # 15 steps per epoch: the momentum fitted to it is 0.9, recorded and used by the model
    assert record["steps_per_epoch"] == 15 and record["bn_momentum"] == 0.9
    assert record["settings"]["model_options"] == {"width": 2, "bn_momentum": 0.9}
