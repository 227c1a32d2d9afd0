"""Rewind points and atomic weight files (real Keras, real files)."""
from __future__ import annotations

import numpy as np
import pytest

from train.checkpoints import RewindPoint, rewind_steps, save_weights_atomic
from train.models import build_model


def test_rewind_points_parse_and_become_steps():
    assert RewindPoint.parse("3ep").step(50) == 150
    assert RewindPoint.parse(" 500IT ").label == "500it"
    assert RewindPoint.parse("0ep").step(50) == 0
    assert rewind_steps(["0ep", "1ep", "70it"], 50, 100) == {"0ep": 0, "1ep": 50, "70it": 70}
    for bad in ("3", "ep", "-1ep", "1.5ep", "3epochs", ""):
        with pytest.raises(ValueError, match="rewind"):
            RewindPoint.parse(bad)


def test_rewind_point_past_the_end_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"rewind: 3ep is step 150, past the end of training \(100 steps"):
        rewind_steps(["1ep", "3ep"], 50, 100)
    with pytest.raises(ValueError, match="101it"):
        rewind_steps(["101it"], 50, 100)


def test_weights_are_written_atomically_with_optimizer_state(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = build_model("lenet_300_100", 3, 4)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (8, 4, 4, 3)).astype("float32")
    model.fit(x, np.arange(8) % 3, verbose=0)
    target = tmp_path / "ckpt" / "3ep.weights.h5"
    save_weights_atomic(model, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["3ep.weights.h5"]  # no temporaries

    keras.utils.set_random_seed(1)
    other = build_model("lenet_300_100", 3, 4)
    other.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="sparse_categorical_crossentropy")
    other.optimizer.build(other.trainable_variables)
    other.load_weights(target)
    for a, b in zip(model.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
    # momentum slots and the step counter travel too: resume needs them
    assert int(other.optimizer.iterations.numpy()) == 1
    for a, b in zip(model.optimizer.variables, other.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_failed_save_leaves_nothing_under_the_final_name(tmp_path):
    model = build_model("lenet_300_100", 3, 4)
    target = tmp_path / "init.weights.h5"
    (tmp_path / "blocker").mkdir()
    with pytest.raises(OSError):
        save_weights_atomic(model, tmp_path / "blocker")  # a directory cannot be replaced by a file
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]


@pytest.fixture(scope="module")
def tiny_run(digits_dir, tmp_path_factory):
    """A real one-epoch dense run with the rewind points 0ep (= init) and 1ep."""
    from train.run import train_dense
    from train.settings import DenseSettings

    return train_dense(DenseSettings(data=str(digits_dir), model="conv_small",
                                     model_options={"blocks": 1, "width": 0.125, "dense": 16},
                                     out=str(tmp_path_factory.mktemp("runs")), epochs=1, batch_size=64,
                                     lr=0.05, augment="none", rewind=("0ep", "1ep")))


def test_identical_checkpoints_share_one_file(tiny_run, tmp_path):
    import shutil

    from common.paths import DenseRunPaths
    from train.checkpoints import list_checkpoints, load_checkpoint

    run = tiny_run
    init, zero = run.checkpoint("init"), run.checkpoint("0ep")
    assert init.stat().st_ino == zero.stat().st_ino and init.stat().st_nlink >= 2
    assert init.stat().st_ino != run.checkpoint("1ep").stat().st_ino  # trained: other bytes
    assert not [p.name for p in run.checkpoints.iterdir() if p.name.startswith(".")]  # no temporaries
    for name in ("init", "0ep"):
        for a, b in zip(load_checkpoint(run.root, name).get_weights(),
                        load_checkpoint(run.root, "init").get_weights()):
            np.testing.assert_array_equal(a, b)
    # Deleting one name leaves the other whole (on a copy: the module's run stays intact).
    copy = DenseRunPaths(tmp_path / run.root.name)
    shutil.copytree(run.root, copy.root)
    expected = copy.checkpoint("0ep").read_bytes()
    copy.checkpoint("init").unlink()
    assert copy.checkpoint("0ep").read_bytes() == expected
    assert "init" not in list_checkpoints(copy)
    load_checkpoint(copy.root, "0ep")


def test_a_checkpoint_with_other_bytes_is_its_own_file(tmp_path):
    import keras

    from common.paths import DenseRunPaths
    from train.checkpoints import save_checkpoint

    run = DenseRunPaths(tmp_path / "dense-x")
    keras.utils.set_random_seed(0)
    model = build_model("lenet_300_100", 3, 4)
    save_checkpoint(model, run, "init")
    save_checkpoint(model, run, "0ep")
    assert run.checkpoint("init").stat().st_ino == run.checkpoint("0ep").stat().st_ino
    model.set_weights([w + 1 for w in model.get_weights()])  # same size, other bytes
    save_checkpoint(model, run, "1ep")
    assert run.checkpoint("1ep").stat().st_size == run.checkpoint("init").stat().st_size
    assert run.checkpoint("1ep").stat().st_ino != run.checkpoint("init").stat().st_ino
    # Re-saving a name that is a link replaces the name only: the twin keeps its bytes.
    before = run.checkpoint("init").read_bytes()
    save_checkpoint(model, run, "0ep")
    assert run.checkpoint("init").read_bytes() == before
    assert run.checkpoint("0ep").stat().st_ino == run.checkpoint("1ep").stat().st_ino
