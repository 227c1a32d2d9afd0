"""The science check: the lottery ticket phenomenon, reproduced on real data.

Real handwritten digits (scikit-learn's `load_digits`, the set the demo dataset is built from),
`lenet_300_100` from the model registry, IMP with rewinding to the initialisation. Expected, as in
Frankle & Carbin (2019): the winning ticket stays within 2 points of the dense network at 80% and
more sparsity, and beats the same sparse network re-initialised at random at >= 90% sparsity.

In-memory arrays (8x8 pixels as RGB in [0, 255], the model's input convention); seeds are fixed.
The pruning rate is 0.5 per round so that 5 rounds reach 96.9% sparsity within the time budget.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from lottery.points.imp import run_imp
from lottery.points.recipe import Recipe, retrain
from lottery.prune import masks
from lottery.prune.stats import prunable_weights

keras = pytest.importorskip("keras")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

SEED = 0
EPOCHS = 10
RATE = 0.5
ROUNDS = 5      # sparsity 0.5, 0.75, 0.875, 0.9375, 0.969


def _digits():
    from sklearn.model_selection import train_test_split

    d = sklearn_datasets.load_digits()
    x = np.repeat((d.images * (255.0 / 16.0)).astype(np.float32)[..., None], 3, axis=-1)
    return train_test_split(x, d.target.astype(np.int32), test_size=0.2, random_state=SEED,
                            stratify=d.target)


@pytest.mark.slow
def test_imp_winning_tickets_on_digits(tmp_path):
    import tensorflow as tf

    from train.models import build_model

    # As the dense runs do (train.local_engine.configure_tensorflow): same seed, same numbers.
    tf.config.experimental.enable_op_determinism()
    x_train, x_val, y_train, y_val = _digits()

    def optimizer():
        return keras.optimizers.SGD(0.05, momentum=0.9)

    recipe = Recipe(optimizer=optimizer(), loss="sparse_categorical_crossentropy", epochs=EPOCHS,
                    train_data=(x_train, y_train), validation_data=(x_val, y_val), batch_size=64)

    keras.utils.set_random_seed(SEED)
    model = build_model("lenet_300_100", 10, 8)
    init = model.get_weights()
    model.compile(optimizer=optimizer(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    dense = model.fit(x_train, y_train, batch_size=64, epochs=EPOCHS, validation_data=(x_val, y_val),
                      verbose=0).history["val_accuracy"][-1]
    assert dense > 0.93, f"dense lenet_300_100 reached only {dense:.3f} on digits"
    final = prunable_weights(model)

    def rewind():
        model.set_weights(init)
        keras.utils.set_random_seed(SEED)
        return model

    def path(r):
        return tmp_path / f"imp-r{r:02d}.npz"

    rounds = run_imp(rewind, final, recipe, rounds=ROUNDS, rate=RATE, mask_path=path)
    table = {round(r["sparsity"], 4): r["accuracy"] for r in rounds}
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))

    # Within 2 points of dense at every sparsity from 80% up to the 90% mark.
    for r in rounds:
        if 0.8 <= r["sparsity"] < 0.95:
            assert r["accuracy"] >= dense - 0.02, (dense, table)

    # Beats random re-initialisation (same mask, fresh init) at >= 90% sparsity.
    last = rounds[-1]
    assert last["sparsity"] >= 0.9
    mask, _ = masks.load_mask(path(ROUNDS))
    control = retrain(rewind(), mask, recipe, reinit_seed=SEED + 1)
    logging.getLogger(__name__).info("dense %.4f; IMP sparsity -> accuracy %s; random re-init at %.4f: %.4f",
                                     dense, table, last["sparsity"], control["accuracy"])
    assert control["sparsity"] == last["sparsity"]
    assert last["accuracy"] > control["accuracy"], (last["accuracy"], control["accuracy"], table)
