"""report.md speaks only of the kinds of points the grid planned."""
from __future__ import annotations

import functools
import json

from common.paths import DenseRunPaths, GridPaths
from common.settings import make_settings, settings_to_dict
from lottery.grid.plan import build_tasks, write_plan
from lottery.grid.scheduler import run_grid
from lottery.grid.settings import GridSettings
from lottery.grid.simulate import sleep_point
from lottery.report.build import build_report

POSITIONS = {"init": 0.0, "final": 2.0}


def _imp_only_grid(tmp_path, run_points: bool) -> GridPaths:
    run = DenseRunPaths(tmp_path / "dense-feedbeef")
    run.root.mkdir()
    run.history.write_text("epoch,loss,accuracy,val_loss,val_accuracy\n1,0.9,0.7,0.8,0.81\n")
    settings = make_settings(GridSettings, {"sparsities": [0.5], "epochs": 2, "rewind": ["init"],
                                            "imp_rounds": 2, "imp_rate": 0.5})
    tasks = [t for t in build_tasks(settings, POSITIONS, {"global-s5000": 0.5}) if t.kind == "imp"]
    assert tasks
    grid = write_plan(GridPaths(run.root / "lottery-imp"), settings_to_dict(settings), tasks,
                      extra={"run": {"positions": POSITIONS}})
    if run_points:
        run_grid(grid.root, execute=functools.partial(sleep_point, run.root, grid.root,
                                                      settings=settings_to_dict(settings)))
    return grid


def test_an_imp_only_report_says_nothing_of_one_shot_points(tmp_path):
    grid = _imp_only_grid(tmp_path, run_points=True)
    out = build_report(grid.root)
    text = out["report"].read_text()
    assert "## Iterative magnitude pruning" in text and out["imp_table"]
    assert "no one-shot points" not in text and "(one-shot masks)" not in text
    assert "## Structured pruning" not in text


def test_an_unfinished_imp_grid_says_its_chains_are_not_finished(tmp_path):
    grid = _imp_only_grid(tmp_path, run_points=False)
    text = build_report(grid.root)["report"].read_text()
    assert "_no IMP chains finished yet_" in text and "no one-shot points" not in text
    assert json.loads((grid.root / "settings.json").read_text())["tasks"]
