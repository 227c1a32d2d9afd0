"""PNG plots of a lottery grid (matplotlib, Agg backend: no display needed on cluster nodes)."""
from __future__ import annotations

import io
import logging
from pathlib import Path

from common.atomic import write_bytes
from common.paths import GridPaths
from lottery.report.results import point_history

log = logging.getLogger(__name__)

CONTROL_STYLE = {"none": "-", "random_reinit": "--", "random_mask": ":"}
CONTROL_MARKER = {"none": "o", "random_reinit": "s", "random_mask": "^"}
MAX_CURVES = 8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: never try a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(path, buf.getvalue())  # atomic: a reader never sees half a PNG
    return path


def _dense_line(ax, dense: float | None) -> None:
    if dense is not None:
        ax.axhline(dense, color="black", linewidth=1.2, alpha=0.7, label=f"dense ({dense:.3f})")


def accuracy_vs_sparsity(path: Path, rows: list[dict], rewinds: list[str], dense: float | None) -> Path:
    """One colour per rewind point; the mask's own result solid, the controls dashed/dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, rewind in enumerate(rewinds):
        for control in ("none", "random_reinit", "random_mask"):
            pts = sorted((r["sparsity"], r["accuracy"]) for r in rows
                         if r["kind"] == "oneshot" and r["rewind"] == rewind and r["control"] == control
                         and r["sparsity"] is not None and r["accuracy"] is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            label = f"rewind {rewind}" + ("" if control == "none" else f", {control}")
            ax.plot(xs, ys, CONTROL_STYLE[control], marker=CONTROL_MARKER[control],
                    color=colours[i % len(colours)], label=label, markersize=5)
    _dense_line(ax, dense)
    ax.set_xlabel("sparsity (fraction of prunable weights removed)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Accuracy after retraining vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def training_curves(path: Path, records: list[dict], pick: list[str]) -> Path:
    """Validation accuracy per epoch of the selected points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    by_id = {r["task_id"]: r for r in records}
    for task_id in pick:
        rows = point_history(by_id[task_id].get("result") or {})
        pts = [(r.get("epoch", i + 1), r["val_accuracy"]) for i, r in enumerate(rows)
               if r.get("val_accuracy") is not None]
        if pts:
            xs, ys = zip(*pts)
            task = by_id[task_id]["task"]
            style = CONTROL_STYLE.get(task.get("control", "none"), "-")
            ax.plot(xs, ys, style, marker=".", label=task_id)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("retraining epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Training curves of selected points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: curves stay visible
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def imp_curve(path: Path, records: list[dict], rows: list[dict], dense: float | None) -> Path:
    """IMP accuracy vs fraction of weights remaining (log axis), one-shot points for comparison."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    chains = [r for r in records if r["task"].get("kind") == "imp"]
    for i, rec in enumerate(chains):
        pts = sorted((1.0 - float(rnd["sparsity"]), float(rnd["accuracy"]))
                     for rnd in (rec.get("result") or {}).get("rounds") or []
                     if rnd.get("sparsity") is not None and rnd.get("accuracy") is not None)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-", marker="o", color=colours[i % len(colours)],
                    label=f"IMP, rewind {rec['task'].get('rewind')}")
    # One-shot masks of the same rewind point, dashed in the chain's colour: IMP vs one-shot.
    chain_rewinds = [rec["task"].get("rewind") for rec in chains]
    for i, rewind in enumerate(chain_rewinds):
        pts = sorted((r["remaining_fraction"], r["accuracy"]) for r in rows
                     if r["kind"] == "oneshot" and r["control"] == "none" and r["rewind"] == rewind
                     and r["remaining_fraction"] and r["accuracy"] is not None)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "--", marker="x", color=colours[i % len(colours)], alpha=0.8,
                    label=f"one-shot, rewind {rewind}")
    _dense_line(ax, dense)
    ax.set_xscale("log")
    _percent_ticks(ax)
    ax.invert_xaxis()  # pruning goes right: from all weights to few
    ax.set_xlabel("prunable weights remaining (log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Iterative magnitude pruning")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _percent_ticks(ax) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = ax.get_xlim()
    lo, hi = min(lo, hi), max(lo, hi)
    ticks = [t for t in (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
             if lo <= t <= hi] or [lo, hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x * 100:g}%"))


def select_curves(rows: list[dict], rewinds: list[str]) -> list[str]:
    """Per rewind point, the sparsest and the densest one-shot mask (no control), then the
    controls at the sparsest mask: the curves that show where training breaks down."""
    picked: list[str] = []
    for rewind in rewinds:
        mine = [r for r in rows if r["kind"] == "oneshot" and r["rewind"] == rewind
                and r["sparsity"] is not None]
        plain = sorted((r for r in mine if r["control"] == "none"), key=lambda r: r["sparsity"])
        if plain:
            picked += [plain[-1]["task_id"], plain[0]["task_id"]]
            top = plain[-1]["threshold_value"]
            picked += [r["task_id"] for r in mine if r["control"] != "none" and r["threshold_value"] == top]
    return list(dict.fromkeys(picked))[:MAX_CURVES]


def accuracy_vs_channel_ratio(path: Path, rows: list[dict], dense: float | None) -> Path:
    """Structured points: one colour per (criterion, draw point); accuracy after retraining solid,
    the compacted network before retraining dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    structured = [r for r in rows if r["kind"] == "structured" and r["ratio"] is not None]
    series = sorted({(r["criterion"], r["rewind"]) for r in structured},
                    key=lambda k: (k[0] or "", min(r["draw_epoch"] or 0.0 for r in structured
                                                   if (r["criterion"], r["rewind"]) == k)))
    for i, (criterion, draw) in enumerate(series):
        mine = [r for r in structured if (r["criterion"], r["rewind"]) == (criterion, draw)]
        for column, style, what in (("accuracy", "-", "retrained"),
                                    ("accuracy_before", "--", "compacted")):
            pts = sorted((r["ratio"], r[column]) for r in mine if r[column] is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, marker="o" if style == "-" else "x",
                        color=colours[i % len(colours)], label=f"{criterion}, draw {draw}, {what}")
    _dense_line(ax, dense)
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax.xaxis.set_major_locator(FixedLocator(sorted({r["ratio"] for r in structured})))  # the grid's
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x * 100:g}%"))
    ax.set_xlabel("channel ratio (fraction of channels removed)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Structured pruning: accuracy vs channel ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def early_bird_heatmap(path: Path, epochs: list[int], distances, drawn_epoch: int | None) -> Path:
    """Pairwise normalised Hamming distance between the epochs' BN channel masks (epoch x epoch),
    as in You et al. 2020, Fig. 2; the epoch where the ticket was drawn is marked."""
    plt = _pyplot()
    n = len(epochs)
    size = min(9.0, 4.0 + 0.05 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    extent = (epochs[0] - 0.5, epochs[-1] + 0.5, epochs[-1] + 0.5, epochs[0] - 0.5)
    image = ax.imshow(distances, cmap="viridis", vmin=0.0, extent=extent, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="mask distance (normalised Hamming)")
    if drawn_epoch is not None:
        ax.axvline(drawn_epoch, color="red", linewidth=1.2, linestyle="--")
        ax.axhline(drawn_epoch, color="red", linewidth=1.2, linestyle="--",
                   label=f"Early-Bird ticket drawn (epoch {drawn_epoch})")
        ax.legend(fontsize=8, loc="lower left")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("epoch")
    ax.set_title("Early-Bird: distance between the epochs' channel masks")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_plots(grid: GridPaths, records: list[dict], rows: list[dict], rewinds: list[str],
                dense: float | None) -> list[Path]:
    """Every plot of the grid's results the data allows (the Early-Bird heat map, drawn from the
    dense run's files, is written by lottery.report.build); returns their paths."""
    out = []
    if any(r["kind"] == "oneshot" for r in rows):
        out.append(accuracy_vs_sparsity(grid.plots / "accuracy_vs_sparsity.png", rows, rewinds, dense))
    pick = select_curves(rows, rewinds) or [r["task_id"] for r in rows][:MAX_CURVES]
    if pick:
        out.append(training_curves(grid.plots / "training_curves.png", records, pick))
    if any(r["task"].get("kind") == "imp" for r in records):
        out.append(imp_curve(grid.plots / "imp.png", records, rows, dense))
    if any(r["kind"] == "structured" for r in rows):
        out.append(accuracy_vs_channel_ratio(grid.plots / "accuracy_vs_channel_ratio.png", rows, dense))
    return out
