"""lottery.points.masked_training: pruned weights stay exactly zero under real Keras training."""
from __future__ import annotations

import numpy as np
import pytest

from common.atomic import read_json
from lottery.points.masked_training import apply_mask, masked_optimizer, nonzero_counts, reinitialize, train_masked
from lottery.prune import masks
from lottery.prune.stats import prunable_weights

keras = pytest.importorskip("keras")


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 1), name="x")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(16, activation="relu", name="fc")(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(x), name="tiny")


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    y = (x[:, :3].sum(axis=(1, 2, 3)) > 0).astype(np.int32) + (x[:, 3:].mean(axis=(1, 2, 3)) > 0.3)
    return x, y.astype(np.int32)


OPTIMIZERS = {
    # Zero-preserving classes: only the gradients are masked, their update keeps zeros at zero.
    "sgd_momentum_wd": lambda: keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adam_amsgrad": lambda: keras.optimizers.Adam(1e-2, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "adamax": lambda: keras.optimizers.Adamax(1e-2),
    "nadam": lambda: keras.optimizers.Nadam(1e-2),
    "rmsprop_centered_momentum": lambda: keras.optimizers.RMSprop(1e-2, momentum=0.9, centered=True),
    "adagrad": lambda: keras.optimizers.Adagrad(0.1),
    "adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "lion_wd": lambda: keras.optimizers.Lion(1e-3, weight_decay=0.1),
    # Muon orthogonalises each kernel's whole update: the weight mask after it is what holds.
    "muon": lambda: keras.optimizers.Muon(1e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero(name):
    model = _model()
    x, y = _data()
    mask = masks.global_magnitude_mask(prunable_weights(model), 0.7)
    start = prunable_weights(model)
    counts = apply_mask(model, mask)
    history = train_masked(model, mask, (x, y), (x[:32], y[:32]), optimizer=OPTIMIZERS[name](),
                           loss="sparse_categorical_crossentropy", epochs=3, batch_size=16,
                           learning_rate=lambda e: 0.05 / (e + 1) if name == "sgd_momentum_wd" else None)
    assert nonzero_counts(model) == counts
    after = prunable_weights(model)
    for k in mask:
        assert np.all(after[k][~mask[k]] == 0.0)
        assert not np.allclose(after[k][mask[k]], start[k][mask[k]])  # kept weights did train
    assert len(history["loss"]) == 3 and len(history["val_accuracy"]) == 3
    if name == "sgd_momentum_wd":
        assert history["lr"] == pytest.approx([0.05, 0.025, 0.05 / 3])


def test_weight_mask_is_skipped_only_where_the_update_keeps_zeros():
    model = _model()
    mask = masks.global_magnitude_mask(prunable_weights(model), 0.7)
    for name, make in OPTIMIZERS.items():
        wrapped = masked_optimizer(make(), model, mask)
        assert wrapped._bt_mask_weights == (name == "muon"), name


def test_muon_without_the_weight_mask_would_revive_pruned_weights():
    """Why Muon keeps the weight mask: with masked gradients alone its update is dense."""
    model = _model()
    x, y = _data()
    mask = masks.global_magnitude_mask(prunable_weights(model), 0.7)
    counts = apply_mask(model, mask)
    opt = masked_optimizer(keras.optimizers.Muon(1e-2), model, mask)
    opt._bt_mask_weights = False
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert sum(nonzero_counts(model).values()) > sum(counts.values())


def test_without_the_masked_optimizer_pruned_weights_revive():
    """The check above can fail: an ordinary optimizer moves zeroed weights (weight decay, momentum)."""
    model = _model()
    x, y = _data()
    mask = masks.global_magnitude_mask(prunable_weights(model), 0.7)
    counts = apply_mask(model, mask)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert sum(nonzero_counts(model).values()) > sum(counts.values())


def test_structured_per_channel_mask_trains_with_whole_channels_off():
    model = _model()
    x, y = _data()
    mask = {"conv/kernel": np.array([True, False, True, False]), "fc/kernel": np.ones((64, 16), bool)}
    mask["fc/kernel"][:, ::2] = False
    train_masked(model, mask, (x, y), (x, y), optimizer=keras.optimizers.Adam(1e-2),
                 loss="sparse_categorical_crossentropy", epochs=1, batch_size=32)
    w = prunable_weights(model)
    assert not w["conv/kernel"][..., 1].any() and not w["conv/kernel"][..., 3].any()
    assert np.count_nonzero(w["conv/kernel"][..., 0]) == 9
    assert not w["fc/kernel"][:, ::2].any() and np.count_nonzero(w["fc/kernel"][:, 1::2]) == 64 * 8


def test_mask_that_does_not_fit_the_model_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="other/kernel"):
        apply_mask(model, {"other/kernel": np.ones((2, 2), bool)})
    with pytest.raises(ValueError, match=r"\(3, 3, 1, 4\)"):
        apply_mask(model, {"conv/kernel": np.ones((5,), bool)})
    with pytest.raises(ValueError, match="epochs"):
        train_masked(model, {}, _data(), None, optimizer="sgd", loss="mse", epochs=0)


def test_masked_optimizer_keeps_class_and_config():
    model = _model()
    mask = masks.global_magnitude_mask(prunable_weights(model), 0.5)
    base = keras.optimizers.SGD(0.03, momentum=0.8, nesterov=True)
    wrapped = masked_optimizer(base, model, mask)
    assert isinstance(wrapped, keras.optimizers.SGD)
    cfg = wrapped.get_config()
    assert cfg["momentum"] == pytest.approx(0.8) and cfg["nesterov"] is True
    assert cfg["learning_rate"] == pytest.approx(0.03)
    again = masked_optimizer(wrapped, model, mask)  # re-wrapping does not stack wrappers
    assert type(again) is type(wrapped)


def test_reinitialize_draws_fresh_weights_per_seed():
    model = _model(seed=0)
    before = prunable_weights(model)
    reinitialize(model, seed=5)
    first = prunable_weights(model)
    reinitialize(model, seed=5)
    second = prunable_weights(model)
    reinitialize(model, seed=6)
    third = prunable_weights(model)
    for k in before:
        assert not np.array_equal(first[k], before[k])
        np.testing.assert_array_equal(first[k], second[k])
        assert not np.array_equal(first[k], third[k])
        # Same distribution family: the scale of a Glorot draw is kept.
        assert np.std(first[k]) == pytest.approx(np.std(before[k]), rel=0.5)


def test_reinitialize_refuses_seeded_initializers():
    inputs = keras.Input((4,))
    out = keras.layers.Dense(2, name="d", kernel_initializer=keras.initializers.GlorotUniform(seed=1))(inputs)
    with pytest.raises(ValueError, match="fixed seed"):
        reinitialize(keras.Model(inputs, out), seed=3)


def _train_tiny(checkpoint=None, stop=None, lr=None, seed=0, epochs=3):
    model = _model(seed)
    x, y = _data()
    mask = masks.global_magnitude_mask(prunable_weights(_model()), 0.6)
    history = train_masked(model, mask, (x, y), (x[:32], y[:32]), optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                           loss="sparse_categorical_crossentropy", epochs=epochs, batch_size=16,
                           learning_rate=lr, label="tiny", checkpoint=checkpoint, stop=stop)
    return model, history


def test_a_stop_ends_training_after_the_batch_it_was_requested_in(tmp_path):
    from common.stop import Preempted, StopToken
    from lottery.points.epoch_checkpoint import EpochCheckpoint

    stop = StopToken()

    def lr(epoch):  # runs as each epoch starts: the stop lands inside the second epoch
        if epoch == 1:
            stop.request()
        return 0.05

    checkpoint = EpochCheckpoint(tmp_path / "state", "tiny|m", seed=1)
    with pytest.raises(Preempted, match="stop requested during an epoch"):
        _train_tiny(checkpoint, stop, lr)
    assert read_json(tmp_path / "state" / "state.json")["epochs_done"] == 1  # the partial epoch is dropped
    with pytest.raises(Preempted, match="before epoch 1 of tiny"):            # still requested
        _train_tiny(stop=stop)


def test_the_stop_is_checked_after_every_batch():
    from common.stop import Preempted, StopToken

    stop = StopToken()
    model = _model()
    x, y = _data()

    def lr(epoch):
        stop.request()
        return 0.05

    with pytest.raises(Preempted):
        train_masked(model, {}, (x, y), optimizer="sgd", loss="sparse_categorical_crossentropy", epochs=2,
                     batch_size=16, learning_rate=lr, stop=stop)
    assert int(model.optimizer.iterations.numpy()) == 1   # 6 batches per epoch, one was trained


def test_a_finished_run_keeps_its_checkpoint_and_a_rerun_trains_nothing(tmp_path):
    """The saved epochs outlive the training: its owner deletes them once the point's result is kept."""
    from lottery.points.epoch_checkpoint import EpochCheckpoint

    trained, history = _train_tiny(EpochCheckpoint(tmp_path / "state", "tiny|m", seed=1))
    assert read_json(tmp_path / "state" / "state.json")["epochs_done"] == 3
    again = EpochCheckpoint(tmp_path / "state", "tiny|m", seed=1)
    rerun, rerun_history = _train_tiny(again, seed=9)   # other starting weights: all restored
    assert again.resumed_from == 3 and rerun_history == history
    assert int(rerun.optimizer.iterations.numpy()) == int(trained.optimizer.iterations.numpy()) == 18
    for a, b in zip(rerun.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(a, b)
