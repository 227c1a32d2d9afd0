"""FGSM / PGD (train.attacks) on a real LeNet-300-100 trained on the digits fixture: the invariants
hold on every example, and the attack ordering and monotonicity hold on the accuracy."""
from __future__ import annotations

import numpy as np
import pytest

from train.attacks import PIXEL_SCALE, AttackConfig, RobustEvaluator, batch_attack, parse_epsilons

EPSILONS = (0.0, 0.02, 0.05, 0.1, 0.2)


@pytest.fixture(scope="module")
def trained(digits):
    import keras
    import tensorflow as tf

    from train.data import make_dataset
    from train.models import build_model

    keras.utils.set_random_seed(0)
    train = make_dataset(digits, "train", batch_size=64, training=True, input_size=16, seed=0,
                         augment="none")
    val = make_dataset(digits, "validation", batch_size=128, training=False, input_size=16)
    model = build_model("lenet_300_100", digits.num_classes, 16)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train.repeat(), steps_per_epoch=25, epochs=6, verbose=0)
    batches = [(tf.constant(x), tf.constant(y)) for x, y in val]
    return model, batches


def test_every_example_stays_in_the_ball_and_the_pixel_range(trained):
    import tensorflow as tf

    model, batches = trained
    for config in (AttackConfig("fgsm"), AttackConfig("pgd", steps=5, restarts=2)):
        attack = batch_attack(model, config)
        for eps in (0.05, 0.2):
            for i, (x, y) in enumerate(batches):
                x_adv, loss, correct = attack(x, y, tf.constant(eps * PIXEL_SCALE),
                                              tf.constant([0, i]))
                x, x_adv = x.numpy(), x_adv.numpy()
                assert np.abs(x_adv - x).max() <= eps * PIXEL_SCALE + 1e-3
                assert x_adv.min() >= 0.0 and x_adv.max() <= 255.0
                assert np.abs(x_adv - x).max() > 0.5 * eps * PIXEL_SCALE  # it did move
                assert loss.shape == correct.shape == (x.shape[0],)


def test_accuracy_ordering_and_epsilon_zero(trained):
    model, batches = trained
    clean = model.evaluate(np.concatenate([b[0] for b in batches]),
                           np.concatenate([b[1] for b in batches]), verbose=0, return_dict=True)
    table = {name: {e: r["accuracy"] for e, r in
                    RobustEvaluator(model, config).evaluate(batches, EPSILONS).items()}
             for name, config in (("fgsm", AttackConfig("fgsm")),
                                  ("pgd10", AttackConfig(steps=10)),
                                  ("pgd40", AttackConfig(steps=40)))}
    assert clean["accuracy"] > 0.6  # a real classifier, or the attack proves nothing
    for row in table.values():
        assert row[0.0] == pytest.approx(clean["accuracy"], abs=1e-6)
        for lo, hi in zip(EPSILONS, EPSILONS[1:]):
            assert row[hi] <= row[lo] + 0.01
    for eps in EPSILONS:
        assert table["pgd10"][eps] <= table["fgsm"][eps] + 0.01
        assert table["pgd40"][eps] <= table["pgd10"][eps] + 0.01
    assert table["pgd10"][0.2] < 0.5 * clean["accuracy"]  # strong enough to matter


def test_restarts_keep_the_worst_case_per_example(trained):
    import tensorflow as tf

    model, batches = trained
    one = batch_attack(model, AttackConfig(steps=3, restarts=1))
    three = batch_attack(model, AttackConfig(steps=3, restarts=3))
    x, y = batches[0]
    eps, seed = tf.constant(0.05 * PIXEL_SCALE), tf.constant([0, 0])
    _, loss1, correct1 = one(x, y, eps, seed)
    _, loss3, correct3 = three(x, y, eps, seed)
    # Restart 0 is the single run; the worst case over restarts is never better for the model.
    assert not np.any(correct3.numpy() & ~correct1.numpy())
    same = correct3.numpy() == correct1.numpy()
    assert np.all(loss3.numpy()[same] >= loss1.numpy()[same] - 1e-5)


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match="epsilon"):
        AttackConfig(epsilon=2.0)
    with pytest.raises(ValueError, match="attack"):
        AttackConfig(attack="cw")
    with pytest.raises(ValueError, match="--eps"):
        parse_epsilons("0,abc")
    assert parse_epsilons("0.1,0,8/255,0.1") == (0.0, round(8 / 255, 6), 0.1)
