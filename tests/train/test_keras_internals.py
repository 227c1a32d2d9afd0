"""train.keras_internals against the public Keras behaviour each shortcut stands in for: an upgrade
of Keras or TensorFlow that changes the private parts fails here."""
from __future__ import annotations

import random

import numpy as np

from train.keras_internals import raw_learning_rate, seed_all


def test_seed_all_seeds_like_keras_set_random_seed():
    """Workers seed with seed_all (which keeps TensorFlow's compiled functions): the same
    shuffles, Keras, NumPy and Python draws as keras.utils.set_random_seed."""
    import keras
    import tensorflow as tf

    def draws(seeder, seed):
        seeder(seed)
        order = [int(v) for v in tf.data.Dataset.range(50).shuffle(50, seed=3)]
        unseeded = [int(v) for v in tf.data.Dataset.range(50).shuffle(50)]  # global seed only
        unseeded_keras = keras.random.uniform((3,)).numpy().tolist()  # Keras' global generator
        return order, unseeded, unseeded_keras, np.random.rand(3).tolist(), random.random()

    assert draws(seed_all, 12) == draws(keras.utils.set_random_seed, 12)
    assert draws(seed_all, 12) != draws(seed_all, 13)


def test_raw_learning_rate_tells_a_constant_rate_from_a_schedule():
    import keras

    constant = raw_learning_rate(keras.optimizers.SGD(0.25))
    assert hasattr(constant, "assign") and float(constant.numpy()) == 0.25

    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    assert raw_learning_rate(keras.optimizers.SGD(schedule)) is schedule
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(schedule))
    assert raw_learning_rate(wrapped) is schedule  # the wrapped optimizer answers

    def rate():
        return 0.5

    assert raw_learning_rate(keras.optimizers.Adam(rate)) is rate
