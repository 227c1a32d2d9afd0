"""The finished grids the report tests read (built once per session; tests copy them to damage them)."""
from __future__ import annotations

import functools
import hashlib
import json

import pytest

from common.paths import DenseRunPaths, GridPaths
from common.settings import make_settings, settings_to_dict
from lottery.grid.plan import build_tasks, write_plan
from lottery.grid.scheduler import run_grid
from lottery.grid.settings import GridSettings
from lottery.grid.simulate import sleep_point

POSITIONS = {"init": 0.0, "1ep": 1.0, "final": 4.0}
VAL_SIZE = 30


@pytest.fixture(scope="session")
def finished_grid(tmp_path_factory):
    """A grid as `plan` lays it out (sparsities x rewinds x controls, plus IMP chains), run to the
    end in this process by the claims scheduler with the sleep workload."""
    run = DenseRunPaths(tmp_path_factory.mktemp("runs") / "dense-feedbeef")
    run.root.mkdir()
    run.history.write_text("epoch,loss,accuracy,val_loss,val_accuracy\n1,0.9,0.7,0.8,0.81\n"
                           "2,0.5,0.9,0.4,0.93\n")
    # The part of a dense run's settings.json the report reads: the dataset's split sizes.
    run.settings.write_text(json.dumps({"schema_version": 1,
                                        "dataset": {"records": {"train": 270, "validation": VAL_SIZE}}}))
    settings = make_settings(GridSettings, {"sparsities": [0.5, 0.8, 0.9, 0.95], "epochs": 4,
                                            "rewind": ["final", "init", "1ep"],
                                            "controls": ["random_reinit", "random_mask"],
                                            "imp_rounds": 4, "imp_rate": 0.5})
    sparsity = {}
    for _kind, value in settings.thresholds:
        sparsity[f"global-s{int(round(value * 10000)):04d}"] = value
    tasks = build_tasks(settings, POSITIONS, _RandomAware(sparsity))
    grid = write_plan(GridPaths(run.root / "lottery-test"), settings_to_dict(settings), tasks,
                      extra={"run": {"positions": POSITIONS}})
    summary = run_grid(grid.root, execute=functools.partial(sleep_point, run.root, grid.root,
                                                            settings=settings_to_dict(settings)))
    assert len(summary.executed) == len(tasks) == 4 * 3 * 3 + 3
    return grid


class _RandomAware(dict):
    """mask id -> sparsity, where a random twin has its base mask's sparsity."""

    def __missing__(self, key):
        return self[key.split("-random")[0]]


def noisy_accuracy(task_id: str, rewind: str, control: str, sparsity: float) -> float:
    """A plausible accuracy on a 30-image validation set: random controls collapse early, and a
    per-point jitter (from the id) stands in for the noise of few images. Multiples of 1/30."""
    base = {"init": 0.80, "1ep": 0.83, "final": 0.77}.get(rewind, 0.8) - 0.4 * sparsity ** 3
    base -= {"none": 0.0, "random_reinit": 0.1 + 0.25 * sparsity,
             "random_mask": 0.15 + 0.45 * sparsity}[control]
    jitter = (int(hashlib.sha256(task_id.encode()).hexdigest()[:4], 16) / 0xFFFF - 0.5) * 0.1
    return round(max(0.1, base + jitter) * VAL_SIZE) / VAL_SIZE


def noisy_point(run_dir, grid_dir, task, settings, stop):
    """sleep_point's record with noisy_accuracy in place of its smooth made-up accuracy."""
    result = sleep_point(run_dir, grid_dir, task, settings, stop)
    result["accuracy"] = noisy_accuracy(task.task_id, task.rewind, task.control, task.sparsity)
    result["history"] = [{**row, "val_accuracy": result["accuracy"] * (1 - 0.5 ** row["epoch"])}
                         for row in result["history"]]
    for rnd in result.get("rounds", []):
        rnd["accuracy"] = noisy_accuracy(f"{task.task_id}-{rnd['round']}", task.rewind, "none",
                                         rnd["sparsity"])
    return result


@pytest.fixture(scope="session")
def noisy_grid(tmp_path_factory):
    """A grid like a newcomer's first one: 3 sparsities x 3 rewind points x 3 controls (27 points,
    9 series) and IMP chains, judged on 30 validation images."""
    run = DenseRunPaths(tmp_path_factory.mktemp("noisy") / "dense-cafe")
    run.root.mkdir()
    run.history.write_text("epoch,loss,accuracy,val_loss,val_accuracy\n1,0.9,0.7,0.8,0.8\n")
    run.settings.write_text(json.dumps({"schema_version": 1,
                                        "dataset": {"records": {"train": 270, "validation": VAL_SIZE}}}))
    settings = make_settings(GridSettings, {"sparsities": [0.5, 0.8, 0.9], "epochs": 3,
                                            "rewind": ["init", "1ep", "final"],
                                            "controls": ["random_reinit", "random_mask"],
                                            "imp_rounds": 3, "imp_rate": 0.5})
    tasks = build_tasks(settings, POSITIONS, _RandomAware(
        {f"global-s{int(round(v * 10000)):04d}": v for _kind, v in settings.thresholds}))
    grid = write_plan(GridPaths(run.root / "lottery-noisy"), settings_to_dict(settings), tasks,
                      extra={"run": {"positions": POSITIONS}})
    run_grid(grid.root, execute=functools.partial(noisy_point, run.root, grid.root,
                                                  settings=settings_to_dict(settings)))
    return grid
