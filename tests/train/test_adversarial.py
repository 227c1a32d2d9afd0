"""Adversarial training (train.adversarial): the installed step trains on PGD examples, on the local
and elephas engines, and the new settings leave existing run names alone."""
from __future__ import annotations

import numpy as np
import pytest

from train import adversarial
from train.attacks import AttackConfig
from train.settings import DenseSettings

TINY = dict(model="lenet_300_100", epochs=1, batch_size=64, lr=0.05, augment="none", seed=1)
ADV = dict(adversarial="pgd", adv_epsilon=0.1, adv_steps=3)


def test_installed_step_reports_the_loss_of_adversarial_examples():
    import keras

    from train.models import build_model

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (64, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 64).astype("int32")
    natural = build_model("lenet_300_100", 10, 16)
    robust = build_model("lenet_300_100", 10, 16)
    robust.set_weights(natural.get_weights())
    n_vars = len(robust.weights)
    adversarial.install(robust, AttackConfig(epsilon=0.1, steps=3))
    assert len(robust.weights) == n_vars  # nothing added to checkpoints or averaged states
    for m in (natural, robust):  # rate 0: the weights stay equal, only the batches differ
        m.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    clean_loss = natural.train_on_batch(x, y, return_dict=True)["loss"]
    adv_loss = robust.train_on_batch(x, y, return_dict=True)["loss"]
    assert adv_loss > clean_loss + 0.05
    assert adversarial.install(natural, None) is natural  # None: natural training, unchanged
    assert natural.train_on_batch(x, y, return_dict=True)["loss"] == pytest.approx(clean_loss)


def test_settings_validate_and_keep_existing_identities(digits):
    from train.run import run_hash

    plain = DenseSettings(data="d", **TINY)
    explicit = DenseSettings(data="d", **TINY, adversarial="none", adv_steps=7)
    assert run_hash(plain, digits) == run_hash(explicit, digits)
    assert run_hash(DenseSettings(data="d", **TINY, **ADV), digits) != run_hash(plain, digits)
    with pytest.raises(ValueError, match="adv_epsilon"):
        DenseSettings(data="d", **TINY, adversarial="pgd")
    assert adversarial.config_from(DenseSettings(data="d", **TINY, **ADV)) == \
        AttackConfig("pgd", epsilon=0.1, steps=3, step_size=None, random_start=True)


def _first_loss(run) -> float:
    from train.run_files import read_history

    return read_history(run)[0]["loss"]


@pytest.mark.parametrize("engine", ["local", "elephas"])
def test_engines_train_adversarially(engine, digits_dir, spark, tmp_path):
    from train.run import train_dense

    extra = {"engine": engine, **({"workers": 2} if engine == "elephas" else {})}
    natural = train_dense(DenseSettings(data=str(digits_dir), out=str(tmp_path), **TINY, **extra),
                          spark=spark)
    robust = train_dense(DenseSettings(data=str(digits_dir), out=str(tmp_path), **TINY, **extra,
                                       **ADV), spark=spark)
    assert robust.success.is_file() and robust.root != natural.root
    # Same initial weights and data order: only the adversarial batches make the loss higher.
    assert _first_loss(robust) > _first_loss(natural) + 0.1
