"""Replicate statistics against hand computations, and a report with 3 replicates and 3 modes."""
from __future__ import annotations

import functools
import math

import pytest

from common.paths import GridPaths
from common.settings import make_settings, settings_to_dict
from lottery.grid.plan import build_tasks, write_plan
from lottery.grid.scheduler import run_grid
from lottery.grid.settings import GridSettings
from lottery.report.build import build_report
from lottery.report.replicate_tables import point_id
from lottery.report.results import read_report_data
from lottery.report.stats import NO_INTERVAL, paired, summarize, t_cdf_two_sided, t_quantile
from tests.lottery.report.conftest import POSITIONS, _RandomAware, noisy_point


@pytest.mark.parametrize("df, printed", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262),
                                         (29, 2.045)])
def test_t_quantile_matches_the_printed_table(df, printed):
    # Two-sided 95% critical values of Student's t as printed in every statistics table.
    assert t_quantile(0.975, df) == pytest.approx(printed, abs=5e-4)
    assert t_cdf_two_sided(t_quantile(0.975, df), df) == pytest.approx(0.95, abs=1e-10)


def test_summary_by_hand():
    # x = 0.90, 0.92, 0.94: mean 0.92; deviations -0.02, 0, 0.02; sum of squares 0.0008;
    # s² = 0.0008 / 2 = 0.0004, s = 0.02; half-width = t(0.975, 2) * 0.02 / sqrt(3)
    #   = 4.302653 * 0.011547005 = 0.049682; CI = [0.870318, 0.969682].
    s = summarize([0.90, 0.92, 0.94])
    assert (s.n, s.mean, s.sd) == (3, pytest.approx(0.92), pytest.approx(0.02))
    assert s.low == pytest.approx(0.870318, abs=1e-6)
    assert s.high == pytest.approx(0.969682, abs=1e-6)
    one = summarize([0.9])
    assert (one.n, one.mean, one.sd, one.low) == (1, 0.9, None, None)


def test_paired_difference_and_verdicts_by_hand():
    ticket = {0: 0.91, 1: 0.93, 2: 0.92}
    # Control 0.88, 0.89, 0.90 -> d = 0.03, 0.04, 0.02: mean 0.03, s = 0.01,
    # half-width = 4.302653 * 0.01 / sqrt(3) = 0.024841 -> [0.005159, 0.054841]: excludes 0.
    better = paired(ticket, {0: 0.88, 1: 0.89, 2: 0.90})
    assert better.difference.mean == pytest.approx(0.03)
    assert better.difference.low == pytest.approx(0.005159, abs=1e-6)
    assert better.difference.high == pytest.approx(0.054841, abs=1e-6)
    assert better.verdict == "better"
    # Control 0.95, 0.95, 0.96 -> d = -0.04, -0.02, -0.04: mean -0.033333, s = 0.011547,
    # half-width = 4.302653 * 0.011547 / sqrt(3) = 0.028684 -> [-0.062018, -0.004649]: worse.
    worse = paired(ticket, {0: 0.95, 1: 0.95, 2: 0.96})
    assert worse.difference.high == pytest.approx(-0.004649, abs=1e-6)
    assert worse.verdict == "worse"
    # d = 0.03, -0.02, 0.00: mean 0.003333, interval straddles 0.
    assert paired(ticket, {0: 0.88, 1: 0.95, 2: 0.92}).verdict == "no detectable difference"
    # Pairs only over the replicates both have: one pair gives no interval.
    only = paired(ticket, {2: 0.5, 7: 0.1})
    assert (only.replicates, only.verdict) == ((2,), NO_INTERVAL)


@pytest.fixture(scope="module")
def replicated_grid(tmp_path_factory):
    """A fabricated grid (noisy accuracies) of 3 replicates x modes weights, lr, finetune."""
    from common.paths import DenseRunPaths

    run = DenseRunPaths(tmp_path_factory.mktemp("rep") / "dense-abad1dea")
    run.root.mkdir()
    run.history.write_text("epoch,loss,accuracy,val_loss,val_accuracy\n1,0.9,0.7,0.8,0.8\n")
    settings = make_settings(GridSettings, {"sparsities": [0.5, 0.9], "epochs": 2, "rewind": ["init"],
                                            "controls": ["random_reinit", "random_mask"],
                                            "replicates": 3, "retrain_modes": ["weights", "lr", "finetune"]})
    tasks = build_tasks(settings, POSITIONS, _RandomAware({"global-s5000": 0.5, "global-s9000": 0.9}))
    grid = write_plan(GridPaths(run.root / "lottery-rep"), settings_to_dict(settings), tasks,
                      extra={"run": {"positions": POSITIONS}})
    run_grid(grid.root, execute=functools.partial(noisy_point, run.root, grid.root,
                                                  settings=settings_to_dict(settings)))
    return grid


def test_report_with_three_replicates_shows_intervals_verdicts_and_modes(replicated_grid):
    out = build_report(replicated_grid.root)
    text = out["report"].read_text()
    assert "## Replicates: mean, standard deviation, 95% confidence interval" in text
    assert "## Tickets vs controls, paired over replicates" in text
    assert "## Retraining modes on the same masks" in text
    assert (replicated_grid.plots / "retrain_modes.png").is_file()
    # The replicate table's numbers are the hand formula applied to the result files.
    rows = read_report_data(replicated_grid.root).rows
    mine = [r["accuracy"] for r in rows if point_id(r["task_id"]) == "oneshot-global-s9000-init-none"]
    assert len(mine) == 3
    mean = sum(mine) / 3
    sd = math.sqrt(sum((a - mean) ** 2 for a in mine) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    line = next(ln for ln in text.splitlines() if ln.startswith("| oneshot-global-s9000-init-none |"))
    assert f"| 3 | {mean:.4f} | {sd:.4f} | [{mean - half:.4f}, {mean + half:.4f}] |" in line
    # Random controls collapse in this fabricated grid: at 90% the ticket beats both.
    paired_lines = [ln for ln in text.splitlines() if ln.startswith("| 0.9000 | weights | init |")]
    assert len(paired_lines) == 2 and all(ln.endswith("| better |") for ln in paired_lines)
    # lr and finetune plan random_mask but not random_reinit controls.
    assert any(ln.startswith("| 0.9000 | lr | init | random_mask |") for ln in text.splitlines())
    assert not any(ln.startswith("| 0.9000 | lr | init | random_reinit |") for ln in text.splitlines())
    # results.csv carries the replicate and the mode.
    header = replicated_grid.results_csv.read_text().splitlines()[0].split(",")
    assert {"replicate", "retrain_mode", "pruned_accuracy"} <= set(header)


def test_report_with_one_replicate_has_no_replicate_sections(finished_grid, tmp_path):
    import shutil

    grid = GridPaths(tmp_path / finished_grid.root.name)
    shutil.copytree(finished_grid.root, grid.root)
    text = build_report(grid.root)["report"].read_text()
    assert "Replicates" not in text and "paired" not in text and "± " not in text
    assert "Retraining modes" not in text
