"""DenseSettings validation, the learning-rate schedule and the run identity."""
from __future__ import annotations

import dataclasses

import pytest

from common.settings import SettingsError, make_settings
from train.run import run_hash
from train.schedules import lr_at
from train.settings import DenseSettings


def _settings(**kw):
    return make_settings(DenseSettings, {"data": "/data/digits", "model": "resnet20", **kw})


@pytest.mark.parametrize("values, field", [
    ({"model": "resnet18"}, "model"),
    ({"engine": "horovod"}, "engine"),
    ({"rewind": "0ep,3xx"}, "rewind"),
    ({"rewind": "1ep,1ep"}, "rewind"),
    ({"epochs": 0}, "epochs"),
    ({"model_options": {"alpha": 0.5}}, "model_options"),
    ({"workers": 4}, "workers"),  # only the elephas engine takes workers
    ({"lr_schedule": "step"}, "lr_decay_epochs"),
    ({"bogus": 1}, "bogus"),
    ({"averaging": 0}, "averaging"),
])
def test_bad_settings_name_the_field(values, field):
    with pytest.raises(SettingsError, match=field):
        _settings(**values)


def test_rewind_list_accepts_a_comma_string_and_normalises_labels():
    s = _settings(rewind="0ep, 2EP,500it", engine="elephas", workers=2, averaging=100)
    assert s.rewind == ("0ep", "2ep", "500it")
    assert s.averaging == 100


def test_learning_rate_schedules():
    cosine = _settings(lr=0.1, epochs=10)
    assert lr_at(cosine, 0) == pytest.approx(0.1)
    assert lr_at(cosine, 5) == pytest.approx(0.05)
    assert lr_at(cosine, 10) == pytest.approx(0.0, abs=1e-12)
    warm = _settings(lr=0.1, epochs=10, warmup_epochs=3, lr_schedule="constant")
    assert [round(lr_at(warm, e), 4) for e in range(5)] == [0.025, 0.05, 0.075, 0.1, 0.1]
    step = _settings(lr=0.1, epochs=10, lr_schedule="step", lr_decay_epochs=[4, 8],
                     lr_decay_factor=0.5)
    assert [lr_at(step, e) for e in (0, 3, 4, 7, 8, 9)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


@dataclasses.dataclass
class _Info:
    manifest_sha256: str


def test_run_hash_is_pinned_and_ignores_where_the_data_and_runs_live():
    info = _Info("ab" * 32)
    s = _settings(rewind="0ep,1ep", epochs=3)
    # Pinned: a change here renames every existing run directory; do it on purpose only.
    assert run_hash(s, info) == "1cbc8650"
    moved = dataclasses.replace(s, data="/elsewhere/digits", out="/scratch/runs", master="local[4]")
    assert run_hash(moved, info) == run_hash(s, info)
    assert run_hash(dataclasses.replace(s, seed=1), info) != run_hash(s, info)
    assert run_hash(s, _Info("cd" * 32)) != run_hash(s, info)


def test_early_stopping_waits_patience_epochs_after_the_best():
    from train.hooks import should_stop_early as _early_stop

    s = _settings(early_stopping_patience=2, epochs=10)
    rows = lambda *losses: [{"val_loss": v, "val_accuracy": 1 - v} for v in losses]  # noqa: E731
    assert not _early_stop(s, rows(1.0, 0.9))
    assert not _early_stop(s, rows(1.0, 0.8, 0.85))
    assert _early_stop(s, rows(1.0, 0.8, 0.85, 0.81))
    assert not _early_stop(_settings(epochs=10), rows(1.0, 2.0, 3.0, 4.0))  # patience 0: off
    acc = _settings(early_stopping_patience=1, early_stopping_metric="val_accuracy", epochs=10)
    assert _early_stop(acc, rows(0.5, 0.3, 0.4))  # accuracy 0.7 best at epoch 2, then lower
    assert not _early_stop(acc, rows(0.5, 0.4, 0.3))
