"""lottery.points.runners and the runners' task checks; a structured point on a real dense run: its
retraining survives a failure after training, and both networks' file sizes are measured alike."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.atomic import read_json
from common.paths import GridPaths
from lottery.points.runners import RUNNERS, train_point
from lottery.points.task import Task, TaskError

REPO = Path(__file__).resolve().parents[3]

ONESHOT = {"task_id": "oneshot-global-s9000-init-none", "kind": "oneshot", "mask_id": "global-s9000",
           "base_mask_id": None, "rewind": "init", "control": "none", "scope": "global",
           "threshold": {"kind": "sparsity", "value": 0.9}, "sparsity": 0.9, "exclude": ["logits"],
           "epochs": 2, "imp_rounds": 0, "imp_rate": 0.0, "seed": 11, "cost": 2.0}


def test_runners_import_without_tensorflow():
    """The scheduler imports the executor before it pins the GPU; `lottery plan`/`status` stay light."""
    code = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Blocked())
import lottery.points.runners, lottery.grid.plan
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_kind_the_plan_makes_has_a_runner():
    assert set(RUNNERS) >= {"oneshot", "imp", "structured", "gmp"}


def test_an_unknown_kind_is_named_with_its_task(tmp_path):
    with pytest.raises(TaskError, match=r"task 'w1': field kind is 'gradual'.*known: gmp, imp, oneshot, "):
        train_point(tmp_path, tmp_path, Task(task_id="w1", kind="gradual"))


def test_result_rows_carry_the_task_fields_they_always_had():
    fields = Task.from_dict(ONESHOT).result_fields()
    assert fields == {"task_id": "oneshot-global-s9000-init-none", "kind": "oneshot", "mask_id": "global-s9000",
                      "base_mask_id": None, "rewind": "init", "control": "none", "scope": "global",
                      "threshold": {"kind": "sparsity", "value": 0.9}, "imp_rounds": 0, "imp_rate": 0.0,
                      "seed": 11, "target_sparsity": 0.9,
                      # issue 13: always in results, at their defaults for a task without them
                      "replicate": 0, "retrain_mode": "weights", "run": None}


@pytest.mark.parametrize("changes, message", [
    ({"mask_id": None}, r"task 'p': field mask_id is missing"),
    ({"kind": "structured", "ratio": 0.5}, r"task 'p': field criterion is missing"),
    ({"kind": "structured", "criterion": "l1"}, r"task 'p': field ratio is missing"),
    ({"kind": "structured", "ratio": 0.5, "criterion": "l1", "control": "random_reinit"},
     r"task 'p': field control is 'random_reinit'; structured points have no controls"),
    ({"kind": "imp", "imp_rounds": 2, "imp_rate": 0.2, "control": "random_mask"},
     r"task 'p': field control is 'random_mask'; IMP chains take no control"),
    ({"kind": "imp", "imp_rounds": 0, "imp_rate": 0.2}, r"task 'p': field imp_rounds must be >= 1"),
    ({"kind": "imp", "imp_rounds": 2, "imp_rate": 1.0}, r"task 'p': field imp_rate must lie strictly between"),
])
def test_what_a_kind_needs_is_checked_before_any_work(tmp_path, changes, message):
    pytest.importorskip("keras")
    task = Task.from_dict({**ONESHOT, "task_id": "p", **changes})
    with pytest.raises(TaskError, match=message):
        train_point(tmp_path / "no-run", tmp_path / "no-grid", task)


# -- a structured point on a real dense run ---------------------------------------------------
@pytest.fixture(scope="module")
def small_run(digits_dir, tmp_path_factory):
    """conv_small (one block, 8 filters) trained one epoch on the 16x16 digits, and a structured
    task on its final weights: half of each layer's channels by L1 norm, two retraining epochs."""
    from lottery.prune.channel_masks import select_channels
    from train.checkpoints import load_checkpoint
    from train.run import train_dense
    from train.settings import DenseSettings

    run = train_dense(DenseSettings(data=str(digits_dir), model="conv_small",
                                    model_options={"blocks": 1, "width": 0.125, "dense": 32},
                                    out=str(tmp_path_factory.mktemp("runs")), epochs=1, batch_size=64,
                                    lr=0.05, augment="none"))
    mask = select_channels(load_checkpoint(run.root, "final"), "l1", 0.5, scope="layer")
    task = Task(task_id="structured-l1-layer-c5000-final", kind="structured",
                mask_id="channels-l1-layer-c5000-final", rewind="final", scope="layer", ratio=0.5,
                criterion="l1", draw_epoch=1.0, epochs=2, seed=5, cost=2.0)
    return run, mask, task


def _grid(run, mask, task, name: str) -> GridPaths:
    """A grid directory of its own under the run, holding the task's mask."""
    from lottery.prune import masks

    grid = GridPaths(run.root / name)
    masks.save_mask(grid.mask(task.mask_id), mask, {**mask.meta, "mask_id": task.mask_id})
    return grid


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_a_structured_point_failing_after_training_resumes_without_retraining(small_run):
    run, mask, task = small_run
    grid = _grid(run, mask, task, "lottery-resume")
    # A file where the models/ directory must go: the point fails saving its model, after training.
    grid.models.write_text("in the way")
    with pytest.raises(OSError):
        train_point(run.root, grid.root, task)
    # The retraining is kept until the result is written (by the scheduler, which then deletes it).
    assert read_json(grid.partial_state(task.task_id) / "state.json")["epochs_done"] == 2

    grid.models.unlink()
    result = train_point(run.root, grid.root, task)
    assert result["resumed_from_epoch"] == 2                 # nothing retrained
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert grid.compact_model(task.task_id).is_file() and grid.compact_litert(task.task_id).is_file()
    assert result["params"] < result["params_dense"]
    assert (result["task_id"], result["kind"], result["ratio"], result["criterion"], result["draw"]) == (
        task.task_id, "structured", 0.5, "l1", "final")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_dense_and_compact_file_sizes_are_measured_alike(small_run):
    """Both as built, uncompiled: a compiled model's file also holds its compile config (~3.5 KB)."""
    from lottery.prune.compaction import compact, file_bytes
    from train.checkpoints import load_checkpoint

    run, mask, task = small_run
    result = train_point(run.root, _grid(run, mask, task, "lottery-sizes").root, task)
    dense = load_checkpoint(run.root, task.rewind)
    assert result["file_bytes_dense"] == file_bytes(dense)
    assert result["file_bytes"] == file_bytes(compact(dense, mask))
    assert result["resumed_from_epoch"] == 0 and len(result["history"]) == 2
