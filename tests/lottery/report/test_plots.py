"""The report's plots hide no data: checked on the figures of a real report with matplotlib's own
geometry (legend boxes and data points in display coordinates, tick positions)."""
from __future__ import annotations

import pytest

from lottery.report import plots
from lottery.report.build import build_report
from lottery.report.results import read_report_data
from tests.lottery.report.conftest import VAL_SIZE

PLANNED = [0.5, 0.8, 0.9, 0.95]                      # the fixture's --sparsities
IMP_ROUNDS = [1 - 0.5 ** r for r in range(1, 5)]     # imp_rounds 4, imp_rate 0.5


def _drawn(finished_grid):
    """name -> figure of every plot of the report, laid out as it is saved."""
    out = {}
    for name, fig, _caption in plots.figures(read_report_data(finished_grid.root)):
        fig.canvas.draw()
        out[name] = fig
    return out


def points_under_legends(fig) -> list[tuple[str, float, float]]:
    """(line label, x, y) of every plotted point (with its marker's radius) inside a legend's box."""
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    boxes = [legend.get_window_extent(renderer) for legend in legends]
    hits = []
    for ax in fig.axes:
        for line in ax.get_lines():
            radius = line.get_markersize() * fig.dpi / 72.0 / 2.0
            for x, y in line.get_transform().transform(line.get_xydata()):
                for box in boxes:
                    if box.x0 - radius <= x <= box.x1 + radius and box.y0 - radius <= y <= box.y1 + radius:
                        hits.append((line.get_label(), float(x), float(y)))
    return hits


def labelled_ticks(ax, axis) -> dict[float, str]:
    """Tick position -> label of the ticks inside the axis' view limits."""
    lo, hi = sorted(ax.get_xlim())
    return {round(float(t.get_loc()), 6): t.label1.get_text() or t.label2.get_text()
            for t in axis.get_major_ticks() if lo <= t.get_loc() <= hi}


@pytest.mark.parametrize("grid", ["finished_grid", "noisy_grid"])
def test_no_legend_covers_a_plotted_point(grid, request):
    figures = _drawn(request.getfixturevalue(grid))
    assert {"accuracy_vs_sparsity.png", "training_curves.png", "imp.png"} <= set(figures)
    for name, fig in figures.items():
        assert any(ax.get_legend() for ax in fig.axes), name
        assert points_under_legends(fig) == [], name


def test_every_series_has_its_own_colour(finished_grid):
    fig = _drawn(finished_grid)["accuracy_vs_sparsity.png"]
    lines = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("dense")]
    assert len(lines) == 9  # 3 rewind points x (mask, 2 controls)
    assert len({tuple(line.get_color()) for line in lines}) == 9
    assert sum(len(line.get_xdata()) for line in lines) == 36


def test_every_planned_sparsity_has_a_labelled_tick(finished_grid):
    figures = _drawn(finished_grid)
    ax = figures["accuracy_vs_sparsity.png"].axes[0]
    ticks = labelled_ticks(ax, ax.xaxis)
    assert [ticks.get(round(s, 6)) for s in PLANNED] == ["50%", "80%", "90%", "95%"], ticks
    imp = figures["imp.png"].axes[0]
    bottom = labelled_ticks(imp, imp.xaxis)  # weights remaining after every planned IMP round
    assert [bottom.get(round(1 - s, 6)) for s in IMP_ROUNDS] == ["50%", "25%", "12.5%", "6.25%"], bottom
    (top,) = imp.child_axes  # remaining at the planned one-shot sparsities, same log scale
    top_ticks = labelled_ticks(imp, top.xaxis)
    assert [top_ticks.get(round(1 - s, 6)) for s in PLANNED] == ["50%", "20%", "10%", "5%"], top_ticks


def test_training_curves_say_how_they_were_selected(finished_grid):
    fig = _drawn(finished_grid)["training_curves.png"]
    title = fig.axes[0].get_title().replace("\n", " ")
    assert title.startswith("Training curves of the sparsest and the densest one-shot mask of each "
                            "rewind point, and the controls of the sparsest")
    assert len(fig.axes[0].get_lines()) == 12 and "first" not in title  # 3 rewinds x (2 + 2 controls)


def test_a_capped_selection_says_so():
    rows = [{"task_id": f"{rewind}-{s}-{control}", "kind": "oneshot", "rewind": rewind,
             "control": control, "sparsity": s, "threshold_value": s}
            for rewind in ("init", "1ep", "2ep", "final") for s in (0.5, 0.9)
            for control in ("none", "random_reinit", "random_mask")]
    pick, rule = plots.select_curves(rows, ["init", "1ep", "2ep", "final"])
    assert len(pick) == plots.MAX_CURVES and rule.endswith(f"(the first {plots.MAX_CURVES} of 16)")
    assert pick[:4] == ["init-0.9-none", "init-0.5-none", "init-0.9-random_reinit",
                        "init-0.9-random_mask"]
    pick, rule = plots.select_curves([{**r, "kind": "imp"} for r in rows[:3]], [])
    assert rule == "the finished points in plan order" and len(pick) == 3


def test_report_states_the_validation_size_and_resolution(finished_grid):
    text = build_report(finished_grid.root)["report"].read_text()
    assert f"Validation set: {VAL_SIZE} images" in text
    assert f"1/{VAL_SIZE} = {1 / VAL_SIZE:.4g}" in text
    assert "training_curves.png" in text and "the sparsest and the densest one-shot mask of each" in text
    fig = _drawn(finished_grid)["accuracy_vs_sparsity.png"]
    assert f"({VAL_SIZE} images)" in fig.axes[0].get_ylabel()


@pytest.mark.parametrize("n", [3, 9, 10, 14, 20, 25])
def test_palette_colours_are_distinct(n):
    assert len(set(plots.palette(n))) == n


def test_equal_accuracies_stay_visible(noisy_grid):
    """On 30 images equal accuracies are common: every point keeps its own spot on the canvas."""
    fig = _drawn(noisy_grid)["accuracy_vs_sparsity.png"]
    lines = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("dense")]
    data = [tuple(p) for line in lines for p in line.get_xydata()]
    assert len(set(data)) < len(data) == 27  # the fixture has ties
    shown = [tuple(p.round(1)) for line in lines
             for p in line.get_transform().transform(line.get_xydata())]
    assert len(set(shown)) == 27


def test_structured_and_early_bird_plots_keep_their_data_visible(tmp_path):
    """accuracy_vs_channel_ratio.png and the Early-Bird heat map, from rows as the report reads them."""
    import numpy as np

    from common.paths import GridPaths
    from lottery.report.results import ReportData

    rows = [{"task_id": f"s-{draw}-{ratio}", "kind": "structured", "rewind": draw, "criterion": "bn",
             "ratio": ratio, "draw_epoch": epoch, "accuracy": 0.9 - ratio / 2 - epoch / 50,
             "accuracy_before": 0.5 - ratio / 2}
            for draw, epoch in (("1ep", 1.0), ("early_bird", 3.0)) for ratio in (0.3, 0.5, 0.7)]
    data = ReportData(GridPaths(tmp_path / "lottery-x"), {"settings": {"channel_ratios": [0.3, 0.5, 0.7]},
                                                          "tasks": []},
                      [], rows, [], 0.91, VAL_SIZE, None, [], [])
    fig = plots.accuracy_vs_channel_ratio(data)
    fig.canvas.draw()
    assert points_under_legends(fig) == []
    ax = fig.axes[0]
    assert list(labelled_ticks(ax, ax.xaxis).values()) == ["30%", "50%", "70%"]
    assert len({tuple(line.get_color()) for line in ax.get_lines()}) == 5  # 4 series + dense

    epochs = list(range(1, 9))
    fig = plots.early_bird_heatmap(epochs, np.random.default_rng(0).random((8, 8)), drawn_epoch=4)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    heat = fig.axes[0]
    legend = heat.get_legend().get_window_extent(renderer)
    image = heat.images[0].get_window_extent(renderer)
    assert legend.y1 <= image.y0 or legend.x0 >= image.x1  # not over the map
