"""PNG plots of a lottery grid (matplotlib's Agg canvas: no display needed on cluster nodes).

Every plot keeps its data visible: legends sit outside the axes, every series has its own colour
from a qualitative palette (marker and line style say which control it is), and each fraction axis
has a labelled tick at every planned value. `figures` draws them (tests inspect the figures with
matplotlib's own geometry); `write_plots` saves them.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Iterator, Sequence

from common.atomic import write_bytes
from lottery.report.replicate_tables import mode_columns
from lottery.report.results import ReportData, planned_imp_sparsities, planned_sparsities, point_history
from lottery.report.stats import summarize
from train.early_bird import distance_matrix

CONTROL_STYLE = {"none": "-", "random_reinit": "--", "random_mask": ":"}
CONTROL_MARKER = {"none": "o", "random_reinit": "s", "random_mask": "^"}
CURVE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
MAX_CURVES = 12  # four per rewind point for three rewind points
FIGSIZE = (7.5, 4.8)
DODGE_POINTS = 8.0  # total sideways spread of the series of accuracy_vs_sparsity.png


def _figure(figsize=FIGSIZE):
    """A figure on an Agg canvas, outside pyplot: nothing global to close, no backend to pick."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def palette(n: int) -> list:
    """`n` colours a reader can tell apart: tab10, then tab20 (its ten strong shades first),
    then evenly spaced hues."""
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        tab20 = matplotlib.colormaps["tab20"]
        return [tab20(i) for i in [*range(0, 20, 2), *range(1, 20, 2)][:n]]
    turbo = matplotlib.colormaps["turbo"]
    return [turbo(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def paired_palette(n: int) -> list[tuple]:
    """`n` (strong, light) pairs of one hue each: two series that belong together."""
    import matplotlib

    if n <= 10:
        tab20 = matplotlib.colormaps["tab20"]
        return [(tab20(2 * i), tab20(2 * i + 1)) for i in range(n)]
    colours = palette(2 * n)
    return list(zip(colours[:n], colours[n:]))


def percent(value: float) -> str:
    return f"{value * 100:.3g}%"


def _legend_outside(ax):
    """Right of the axes, so it covers no data; bbox_inches="tight" keeps it in the PNG."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _dense_line(ax, dense: float | None) -> None:
    if dense is not None:
        ax.axhline(dense, color="black", linewidth=1.2, alpha=0.7, label=f"dense ({dense:.3f})")


def _accuracy_label(ax, size: int | None) -> None:
    ax.set_ylabel("validation accuracy" + (f" ({size} images)" if size else ""))


def _remaining_log(sparsity):
    """Sparsity -> -log10(weights remaining): 90%, 99%, 99.9% sparse are evenly spaced."""
    import numpy as np

    return -np.log10(1.0 - np.clip(sparsity, 0.0, 1.0 - 1e-9))


def _sparsity_from_remaining_log(value):
    import numpy as np

    return 1.0 - np.power(10.0, -np.asarray(value, dtype=float))


def _fraction_limits(ax, values: Sequence[float], *, invert: bool = False) -> None:
    """x limits that show every value (data and planned ticks), with a margin on the axis' scale."""
    import numpy as np

    if not values:
        return
    scale = ax.xaxis.get_transform()
    lo, hi = scale.transform(np.array([min(values), max(values)], dtype=float))
    pad = 0.05 * max(hi - lo, 0.05)
    lo, hi = scale.inverted().transform(np.array([lo - pad, hi + pad]))
    ax.set_xlim((hi, lo) if invert else (lo, hi))


def _fraction_ticks(ax, axis, ticks: Sequence[float], show=percent) -> None:
    """A labelled tick at every value of `ticks` on `axis` (ax.xaxis or a secondary axis' xaxis),
    labels turned when neighbours would touch. Call after the limits are set."""
    import numpy as np
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = sorted(set(ticks))
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())  # a log axis' unlabelled minor ticks read as data
    axis.set_major_formatter(FuncFormatter(lambda x, _pos: show(x)))
    scale = ax.xaxis.get_transform()
    lo, hi = scale.transform(np.array(ax.get_xlim(), dtype=float))
    where = np.sort(np.abs(scale.transform(np.array(ticks, dtype=float)) - lo) / abs(hi - lo))
    if np.any(np.diff(where) < 0.07):
        axis.set_tick_params(labelrotation=45)
        for label in axis.get_ticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")


def _dodge(ax, index: int, count: int, spread: float = DODGE_POINTS):
    """ax.transData shifted sideways by a few typographic points for series `index` of `count`:
    with few validation images equal accuracies are common, and equal points would hide each
    other. The shift is far smaller than the distance between planned sparsities."""
    from matplotlib.transforms import ScaledTranslation

    shift = 0.0 if count < 2 else spread * (index / (count - 1) - 0.5)
    return ax.transData + ScaledTranslation(shift / 72.0, 0.0, ax.figure.dpi_scale_trans)


def accuracy_vs_sparsity(data: ReportData):
    """One series per (rewind point, control), each its own colour; the mask's own result solid
    with circles, the controls dashed (random re-init, squares) and dotted (random mask, triangles)."""
    fig, ax = _figure()
    series = []
    weights = [r for r in data.rows if (r.get("retrain_mode") or "weights") == "weights"]
    for rewind in data.rewinds:
        for control in CONTROL_STYLE:
            pts = replicate_means(r for r in weights
                                  if r["kind"] == "oneshot" and r["rewind"] == rewind
                                  and r["control"] == control)
            if pts:
                series.append((f"rewind {rewind}" + ("" if control == "none" else f", {control}"),
                               control, pts))
    for i, (colour, (label, control, pts)) in enumerate(zip(palette(len(series)), series)):
        _series_with_band(ax, pts, CONTROL_STYLE[control], CONTROL_MARKER[control], colour, label,
                          _dodge(ax, i, len(series)))
    _finish_accuracy_vs_sparsity(ax, data, series, "Accuracy after retraining vs sparsity")
    return fig


def _finish_accuracy_vs_sparsity(ax, data, series, title: str) -> None:
    """The dense line, the log-remaining sparsity axis with a tick per planned sparsity, labels,
    the title (noting the replicate bands when there are any) and the legend beside the axes."""
    _dense_line(ax, data.dense)
    planned = planned_sparsities(data.plan)
    ax.set_xscale("function", functions=(_remaining_log, _sparsity_from_remaining_log))
    _fraction_limits(ax, [p[0] for *_, pts in series for p in pts] + planned)
    _fraction_ticks(ax, ax.xaxis, planned)
    ax.set_xlabel("sparsity (% of prunable weights removed; log scale of the weights remaining)")
    _accuracy_label(ax, data.validation_size)
    ax.set_title(title + (" (mean, band: 95% CI over replicates)" if _has_band(series) else ""))
    ax.grid(alpha=0.3)
    _legend_outside(ax)


def replicate_means(rows) -> list[tuple[float, float, float | None, float | None]]:
    """(sparsity, mean accuracy, CI low, CI high) per mask threshold of `rows`, by sparsity; the
    interval is None for fewer than two replicates (a point is then exactly its result)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["sparsity"] is not None and r["accuracy"] is not None:
            groups.setdefault((r["threshold_kind"], r["threshold_value"], r["sparsity"]
                               if r["threshold_value"] is None else None), []).append(r)
    out = []
    for found in groups.values():
        acc = summarize([r["accuracy"] for r in found])
        out.append((summarize([r["sparsity"] for r in found]).mean, acc.mean, acc.low, acc.high))
    return sorted(out)


def _has_band(series) -> bool:
    return any(p[2] is not None for *_, pts in series for p in pts)


def _series_with_band(ax, pts, style: str, marker: str, colour, label: str, transform) -> None:
    """A series of replicate_means: the means as a line, their 95% CIs as a shaded band."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    (line,) = ax.plot(xs, ys, style, marker=marker, color=colour, label=label, markersize=5)
    line.set_transform(transform)  # after plot(): the limits are the data's
    band = [p for p in pts if p[2] is not None]
    if band:
        shade = ax.fill_between([p[0] for p in band], [p[2] for p in band], [p[3] for p in band],
                                color=colour, alpha=0.18, linewidth=0)
        shade.set_transform(transform)  # after: the band counts for the limits


def retrain_modes_plot(data: ReportData):
    """The tickets of each retraining mode (and rewind point) vs sparsity, with 95% CI bands."""
    fig, ax = _figure()
    series = []
    for mode, rewind in mode_columns(data.rows):
        pts = replicate_means(r for r in data.rows if r["kind"] == "oneshot" and r["control"] == "none"
                              and (r.get("retrain_mode") or "weights") == mode and r["rewind"] == rewind)
        if pts:
            series.append((mode + ("" if mode == "finetune" else f", rewind {rewind}"), mode, pts))
    styles = {"weights": ("-", "o"), "lr": ("--", "s"), "finetune": (":", "^")}
    for i, (colour, (label, mode, pts)) in enumerate(zip(palette(len(series)), series)):
        style, marker = styles.get(mode, ("-", "o"))
        _series_with_band(ax, pts, style, marker, colour, label, _dodge(ax, i, len(series)))
    _finish_accuracy_vs_sparsity(ax, data, series, "Retraining modes on the same masks")
    return fig


def select_curves(rows: list[dict], rewinds: list[str]) -> tuple[list[str], str]:
    """The points whose training curves are drawn, and the rule that picked them (for the title).

    Per rewind point, the sparsest and the densest one-shot mask (no control), then the controls
    at the sparsest mask: the curves that show where training breaks down. Without one-shot
    points, the finished points in plan order. At most MAX_CURVES."""
    picked: list[str] = []
    for rewind in rewinds:
        mine = [r for r in rows if r["kind"] == "oneshot" and r["rewind"] == rewind
                and r["sparsity"] is not None and not r.get("replicate")  # replicate 0,
                and (r.get("retrain_mode") or "weights") == "weights"]      # weight rewinding
        plain = sorted((r for r in mine if r["control"] == "none"), key=lambda r: r["sparsity"])
        if plain:
            picked += [plain[-1]["task_id"], plain[0]["task_id"]]
            top = plain[-1]["threshold_value"]
            picked += [r["task_id"] for r in mine if r["control"] != "none" and r["threshold_value"] == top]
    picked = list(dict.fromkeys(picked))
    rule = ("the sparsest and the densest one-shot mask of each rewind point, and the controls of "
            "the sparsest")
    if not picked:
        picked, rule = [r["task_id"] for r in rows], "the finished points in plan order"
    shown = picked[:MAX_CURVES]
    if len(shown) < len(picked):
        rule += f" (the first {len(shown)} of {len(picked)})"
    return shown, rule


def training_curves(data: ReportData, pick: list[str], rule: str):
    """Validation accuracy per epoch of the selected points; the title says how they were picked."""
    fig, ax = _figure()
    by_id = {r["task_id"]: r for r in data.records}
    colours = palette(len(pick))
    for i, task_id in enumerate(pick):
        rows = point_history(by_id[task_id].get("result") or {})
        pts = [(r.get("epoch", j + 1), r["val_accuracy"]) for j, r in enumerate(rows)
               if r.get("val_accuracy") is not None]
        if pts:
            xs, ys = zip(*pts)
            style = CONTROL_STYLE.get(by_id[task_id]["task"].get("control", "none"), "-")
            ax.plot(xs, ys, style, marker=CURVE_MARKERS[i % len(CURVE_MARKERS)], markersize=4,
                    color=colours[i], label=task_id)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("retraining epoch")
    _accuracy_label(ax, data.validation_size)
    ax.set_title(textwrap.fill(f"Training curves of {rule}", 80), fontsize=9)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def imp_curve(data: ReportData):
    """IMP accuracy vs fraction of weights remaining (log axis), with the one-shot masks of the
    same rewind point in a light shade of the chain's colour. Bottom ticks: every planned IMP
    round; top ticks: every planned one-shot sparsity."""
    fig, ax = _figure()
    chains = [r for r in data.records if r["task"].get("kind") == "imp"]
    xs_all: list[float] = []
    for (strong, light), rec in zip(paired_palette(len(chains)), chains):
        rewind = rec["task"].get("rewind")
        pts = sorted((1.0 - float(rnd["sparsity"]), float(rnd["accuracy"]))
                     for rnd in (rec.get("result") or {}).get("rounds") or []
                     if rnd.get("sparsity") is not None and rnd.get("accuracy") is not None)
        oneshot = sorted((r["remaining_fraction"], r["accuracy"]) for r in data.rows
                         if r["kind"] == "oneshot" and r["control"] == "none" and r["rewind"] == rewind
                         and r["remaining_fraction"] and r["accuracy"] is not None)
        for what, points, style, marker, colour in (("IMP", pts, "-", "o", strong),
                                                    ("one-shot", oneshot, "--", "x", light)):
            if points:
                xs, ys = zip(*points)
                xs_all += xs
                ax.plot(xs, ys, style, marker=marker, color=colour, label=f"{what}, rewind {rewind}")
    _dense_line(ax, data.dense)
    rounds = [1.0 - s for s in planned_imp_sparsities(data.plan)]
    oneshot_planned = [1.0 - s for s in planned_sparsities(data.plan)]
    ax.set_xscale("log")
    _fraction_limits(ax, xs_all + rounds + oneshot_planned, invert=True)  # pruning goes right
    _fraction_ticks(ax, ax.xaxis, rounds)
    ax.set_xlabel("prunable weights remaining (log scale; ticks: every planned IMP round)")
    if oneshot_planned:
        top = ax.secondary_xaxis("top")
        _fraction_ticks(ax, top.xaxis, oneshot_planned)
        top.set_xlabel("remaining at the planned one-shot sparsities", fontsize=8)
    _accuracy_label(ax, data.validation_size)
    ax.set_title("Iterative magnitude pruning")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def accuracy_vs_channel_ratio(data: ReportData):
    """Structured points: one colour pair per (criterion, draw point); accuracy after retraining
    solid, the compacted network before retraining dashed in the light shade."""
    fig, ax = _figure()
    structured = [r for r in data.rows if r["kind"] == "structured" and r["ratio"] is not None]
    series = sorted({(r["criterion"], r["rewind"]) for r in structured},
                    key=lambda k: (k[0] or "", min(r["draw_epoch"] or 0.0 for r in structured
                                                   if (r["criterion"], r["rewind"]) == k)))
    for i, (colours, (criterion, draw)) in enumerate(zip(paired_palette(len(series)), series)):
        mine = [r for r in structured if (r["criterion"], r["rewind"]) == (criterion, draw)]
        for j, column, style, what in ((0, "accuracy", "-", "retrained"),
                                       (1, "accuracy_before", "--", "compacted")):
            pts = sorted((r["ratio"], r[column]) for r in mine if r[column] is not None)
            if pts:
                xs, ys = zip(*pts)
                (line,) = ax.plot(xs, ys, style, marker="o" if style == "-" else "x", color=colours[j],
                                  label=f"{criterion}, draw {draw}, {what}")
                line.set_transform(_dodge(ax, 2 * i + j, 2 * len(series)))  # equal values stay visible
    _dense_line(ax, data.dense)
    planned = list((data.plan.get("settings") or {}).get("channel_ratios") or
                   {r["ratio"] for r in structured})
    _fraction_limits(ax, [r["ratio"] for r in structured] + planned)
    _fraction_ticks(ax, ax.xaxis, planned)
    ax.set_xlabel("channel ratio (% of channels removed; ticks: the planned ratios)")
    _accuracy_label(ax, data.validation_size)
    ax.set_title("Structured pruning: accuracy vs channel ratio")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def early_bird_heatmap(epochs: list[int], distances, drawn_epoch: int | None):
    """Pairwise normalised Hamming distance between the epochs' BN channel masks (epoch x epoch),
    as in You et al. 2020, Fig. 2; the epoch where the ticket was drawn is marked."""
    n = len(epochs)
    size = min(9.0, 4.0 + 0.05 * n)
    fig, ax = _figure((size + 1.2, size))
    extent = (epochs[0] - 0.5, epochs[-1] + 0.5, epochs[-1] + 0.5, epochs[0] - 0.5)
    image = ax.imshow(distances, cmap="viridis", vmin=0.0, extent=extent, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="mask distance (normalised Hamming)")
    if drawn_epoch is not None:
        ax.axvline(drawn_epoch, color="red", linewidth=1.2, linestyle="--")
        ax.axhline(drawn_epoch, color="red", linewidth=1.2, linestyle="--",
                   label=f"Early-Bird ticket drawn (epoch {drawn_epoch})")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below the map
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("epoch")
    ax.set_title("Early-Bird: distance between the epochs' channel masks")
    return fig


def figures(data: ReportData) -> Iterator[tuple[str, object, str]]:
    """(file name, figure, caption) of every plot the data allows, drawn one at a time."""
    rows = data.rows
    if any(r["kind"] == "oneshot" for r in rows):
        yield ("accuracy_vs_sparsity.png", accuracy_vs_sparsity(data),
               "One-shot masks: accuracy after retraining vs sparsity, one series per rewind point "
               f"and control (shifted sideways by up to {DODGE_POINTS / 2:g} pt so that equal "
               "accuracies stay visible).")
    if len({m for m, _ in mode_columns(rows)}) > 1:
        yield ("retrain_modes.png", retrain_modes_plot(data),
               "Weight rewinding, learning-rate rewinding and fine-tuning on the same masks: mean "
               "accuracy of each mask's own points vs sparsity (shaded: 95% CI over replicates).")
    pick, rule = select_curves(rows, data.rewinds)
    if pick:
        yield ("training_curves.png", training_curves(data, pick, rule),
               f"Validation accuracy per retraining epoch of {rule}.")
    if any(r["task"].get("kind") == "imp" for r in data.records):
        yield ("imp.png", imp_curve(data),
               "IMP chains vs the one-shot masks of the same rewind point, by weights remaining.")
    if any(r["kind"] == "structured" for r in rows):
        yield ("accuracy_vs_channel_ratio.png", accuracy_vs_channel_ratio(data),
               "Structured points: accuracy of the compacted network before and after retraining "
               f"(shifted sideways by up to {DODGE_POINTS / 2:g} pt so that equal accuracies stay "
               "visible).")
    if len(data.early_bird_masks) >= 2:
        yield ("early_bird_distances.png",
               early_bird_heatmap(data.early_bird_epochs, distance_matrix(data.early_bird_masks),
                                  (data.early_bird or {}).get("drawn_epoch")),
               "Distance between the dense run's per-epoch channel masks (Early-Bird).")


def write_plots(data: ReportData) -> list[tuple[Path, str]]:
    """Every plot of `figures` under the grid's plots/ (atomic writes); (path, caption) each."""
    written = []
    for name, fig, caption in figures(data):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        path = data.grid.plots / name
        write_bytes(path, buf.getvalue())  # atomic: a reader never sees half a PNG
        written.append((path, caption))
    return written
