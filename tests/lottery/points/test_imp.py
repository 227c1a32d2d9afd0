"""lottery.points.imp and lottery.points.recipe.retrain: IMP chains, resumable by round; the random_reinit control."""
from __future__ import annotations

import numpy as np
import pytest

from lottery.points.imp import run_imp
from lottery.points.recipe import Recipe, retrain
from lottery.points.task import Task
from lottery.prune import masks
from lottery.prune.stats import prunable_weights

keras = pytest.importorskip("keras")


def _model():
    inputs = keras.Input((8,), name="x")
    x = keras.layers.Dense(24, activation="relu", name="fc1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(x), name="mlp")


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(128, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    keras.utils.set_random_seed(seed)
    model = _model()
    init = model.get_weights()
    recipe = Recipe(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy",
                    epochs=2, train_data=(x, y), validation_data=(x[:64], y[:64]), batch_size=32)
    return model, init, recipe


class Rewinder:
    """Loads the rewind weights; counts rounds trained; can simulate a kill at a given round."""

    def __init__(self, model, init, fail_at=None):
        self.model, self.init, self.fail_at, self.calls = model, init, fail_at, 0

    def __call__(self):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        self.model.set_weights(self.init)
        keras.utils.set_random_seed(7)
        return self.model


def test_imp_chain_prunes_remaining_and_resumes_by_round(tmp_path):
    model, init, recipe = _setup()
    final = {k: v + 0.01 for k, v in prunable_weights(model).items()}  # stands in for trained weights

    def path(r):
        return tmp_path / "masks" / f"imp-r{r:02d}.npz"

    total = sum(v.size for v in final.values())

    rewinder = Rewinder(model, init, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_imp(rewinder, final, recipe, rounds=3, rate=0.5, mask_path=path, exclude=["out"])
    # Rounds 1-2 complete (result in their mask file); round 3's mask was written before the kill.
    assert "result" in masks.load_mask(path(2))[1] and "result" not in masks.load_mask(path(3))[1]
    done = [masks.load_mask(path(r))[1]["result"] for r in (1, 2)]

    resumed = Rewinder(model, init)
    results = run_imp(resumed, final, recipe, rounds=3, rate=0.5, mask_path=path, exclude=["out"])
    assert resumed.calls == 1  # only round 3 was trained again
    assert [r["round"] for r in results] == [1, 2, 3]
    assert results[:2] == done

    prunable = total - final["out/kernel"].size
    left = prunable
    previous = None
    for r in (1, 2, 3):
        mask, meta = masks.load_mask(path(r))
        assert mask["out/kernel"].all()
        left -= int(np.floor(0.5 * left + 0.5))
        assert sum(int(np.count_nonzero(m)) for m in mask.values()) == left + final["out/kernel"].size
        assert results[r - 1]["remaining_weights"] == left + final["out/kernel"].size
        assert results[r - 1]["sparsity"] == pytest.approx(meta["sparsity"]["overall"])
        if previous is not None:
            assert not (mask["fc1/kernel"] & ~previous["fc1/kernel"]).any()  # nested masks
        previous = mask
        assert 1 <= results[r - 1]["epochs_to_best"] <= 2 and len(results[r - 1]["history"]) == 2

    again = Rewinder(model, init)
    assert run_imp(again, final, recipe, rounds=3, rate=0.5, mask_path=path, exclude=["out"]) == results
    assert again.calls == 0  # a finished chain trains nothing


def test_imp_rejects_bad_arguments(tmp_path):
    model, init, recipe = _setup()
    final = prunable_weights(model)
    with pytest.raises(ValueError, match="imp_rate"):
        run_imp(Rewinder(model, init), final, recipe, rounds=2, rate=1.0, mask_path=lambda r: tmp_path / f"{r}.npz")
    with pytest.raises(ValueError, match="imp_rounds"):
        run_imp(Rewinder(model, init), final, recipe, rounds=0, rate=0.2, mask_path=lambda r: tmp_path / f"{r}.npz")


def test_retrain_reports_the_point_and_random_reinit_changes_the_start():
    model, init, recipe = _setup()
    mask = masks.global_magnitude_mask(prunable_weights(model), 0.6)
    result = retrain(model, mask, recipe)
    assert set(result) >= {"accuracy", "loss", "best_accuracy", "epochs_to_best", "sparsity", "wall_time_s",
                           "history", "remaining_weights", "total_weights", "layer_sparsity"}
    assert result["sparsity"] == pytest.approx(masks.mask_sparsity(mask)["overall"])
    assert result["accuracy"] == result["history"][-1]["val_accuracy"]
    assert result["best_accuracy"] == max(row["val_accuracy"] for row in result["history"])

    one_epoch = Recipe(**{**recipe.__dict__, "epochs": 1})

    def run(reinit_seed):
        model.set_weights(init)
        keras.utils.set_random_seed(7)
        out = retrain(model, mask, one_epoch, reinit_seed=reinit_seed)
        return out, prunable_weights(model)

    plain, plain_w = run(None)
    plain_again, plain_again_w = run(None)
    control, control_w = run(11)
    np.testing.assert_array_equal(plain_w["fc1/kernel"], plain_again_w["fc1/kernel"])  # deterministic
    assert not np.allclose(control_w["fc1/kernel"], plain_w["fc1/kernel"], atol=1e-3)  # other start
    assert np.all(control_w["fc1/kernel"][~mask["fc1/kernel"]] == 0.0)
    assert control["sparsity"] == result["sparsity"]


@pytest.fixture(scope="module")
def digits_run(spark, tmp_path_factory):
    """A real dense run: the ETL job's digits dataset (8x8), lenet_300_100 trained 2 epochs locally."""
    from etl.job import prepare
    from etl.settings import EtlSettings
    from train.run import train_dense
    from train.settings import DenseSettings

    root = tmp_path_factory.mktemp("lottery-run")
    prepare(EtlSettings(source="digits", out=str(root / "digits8"), resize="fixed:8", format="tfrecord",
                        train_shards=1, validation_shards=1), spark=spark)
    return train_dense(DenseSettings(data=str(root / "digits8"), model="lenet_300_100", out=str(root / "runs"),
                                     epochs=2, rewind=("1ep",), batch_size=64, lr=0.05, augment="none"))


@pytest.mark.slow
def test_train_point_and_imp_task_on_a_real_dense_run(digits_run):
    from common.paths import GridPaths
    from lottery.points.imp import round_mask_id, run_imp_task
    from lottery.points.runners import train_point
    from train.checkpoints import load_checkpoint

    grid = GridPaths(digits_run.root / "lottery-test")
    final = prunable_weights(load_checkpoint(digits_run.root, "final"))
    mask = masks.global_magnitude_mask(final, 0.8, exclude=["logits"])
    masks.save_mask(grid.mask("global-s8000"), mask, {"mask_id": "global-s8000"})
    base = {"kind": "oneshot", "mask_id": "global-s8000", "scope": "global", "exclude": ["logits"],
            "threshold": {"kind": "sparsity", "value": 0.8}, "sparsity": 0.8, "epochs": 1,
            "imp_rounds": 0, "imp_rate": 0.0, "seed": 5}

    point = train_point(digits_run.root, grid.root,
                        Task.from_dict({**base, "task_id": "p-1ep", "rewind": "1ep", "control": "none"}))
    assert point["task_id"] == "p-1ep" and point["rewind"] == "1ep"
    assert point["sparsity"] == pytest.approx(masks.mask_sparsity(mask)["overall"])
    assert 0.0 <= point["accuracy"] <= 1.0 and len(point["history"]) == 1
    # Schedule continues from the rewind point: epoch 1 of the dense run's cosine schedule.
    from lottery.points.recipe import open_dense_run
    from train.schedules import lr_at

    assert point["history"][0]["lr"] == pytest.approx(lr_at(open_dense_run(digits_run.root).settings, 1.0), rel=1e-5)
    control = train_point(digits_run.root, grid.root,
                          Task.from_dict({**base, "task_id": "p-init-rr", "rewind": "init",
                                          "control": "random_reinit"}))
    assert control["control"] == "random_reinit" and control["sparsity"] == point["sparsity"]

    with pytest.raises(ValueError, match="mask_id"):
        train_point(digits_run.root, grid.root, Task.from_dict({**base, "task_id": "bad", "rewind": "init",
                                                                "control": "none", "mask_id": "../../escape"}))
    with pytest.raises(ValueError, match="control"):
        train_point(digits_run.root, grid.root, Task.from_dict({**base, "task_id": "bad", "rewind": "init",
                                                                "control": "magic"}))

    chain = Task.from_dict({**base, "task_id": "imp-chain", "kind": "imp", "mask_id": None, "rewind": "init",
                            "control": "none", "threshold": None, "imp_rounds": 2, "imp_rate": 0.5})
    result = train_point(digits_run.root, grid.root, chain)  # dispatches to the IMP chain
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["mask_id"] == round_mask_id("imp-chain", 2)
    included = sum(v.size for k, v in final.items() if "logits" not in k)
    left = included
    for _ in range(2):
        left -= int(np.floor(0.5 * left + 0.5))
    assert result["remaining_weights"] == left + final["logits/kernel"].size
    stamp = grid.mask(round_mask_id("imp-chain", 2)).stat().st_mtime_ns
    assert run_imp_task(digits_run.root, grid.root, chain) == result  # finished chain: nothing retrained
    assert grid.mask(round_mask_id("imp-chain", 2)).stat().st_mtime_ns == stamp
