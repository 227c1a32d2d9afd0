"""The one place in `train` that touches private parts of Keras 3 / TensorFlow 2.19.

Each function names what it needs from the pinned versions; tests/train/test_keras_internals.py
compares them against the public behaviour they shortcut, so an upgrade that changes the
internals fails there and not in a training run. Keras and TensorFlow are imported on call: Spark
workers must pin their GPU before TensorFlow is first imported.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np


def seed_all(seed: int) -> None:
    """`keras.utils.set_random_seed(seed)` without clearing TensorFlow's eager caches.

    `tf.random.set_seed` also clears the eager context's caches, which drops every instantiated
    tf.function: after it, the model's train step and the state I/O functions are instantiated
    (and graph-optimised) again, ~2.5 s a round for a small MobileNetV2 on an idle core
    (bench/train_throughput.py, part c). The seeds set are the same; what the clearing would
    also reset, stateful random kernels cached in eager mode, is not used here: tf.data takes
    its seeds when a dataset is built and Keras layers draw from their own SeedGenerator.
    """
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils
    from tensorflow.python.eager import context

    seed = int(seed)
    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    ctx = context.context()
    ctx._seed = seed                  # what context._set_global_seed sets, minus the cache clear
    ctx._rng = random.Random(seed)


def raw_learning_rate(optimizer) -> Any:
    """What the optimizer holds as its learning rate: a variable for a constant rate, else the
    LearningRateSchedule or callable it was given (the public `learning_rate` evaluates those).
    A LossScaleOptimizer answers for the optimizer it wraps."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner._learning_rate
