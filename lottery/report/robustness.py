"""The report's robustness section: robust accuracy against sparsity per epsilon, tickets vs their
controls, from the robustness grids under a lottery grid (lottery.grid.robustness_plan).

One table per attack (robustness grid): rows are the dense model and, per target sparsity, the
ticket and each control; columns are the epsilons; a cell is the mean robust accuracy over the
replicates that finished (± the 95% CI half-width with lottery.report.stats when there are at
least two), else the single value. With replicates, a paired table compares each ticket with each
control over the same replicates (difference, 95% CI, verdict). The plot draws robust accuracy
against sparsity, one colour per epsilon, line style by control, the dense model as a dotted level.
"""
from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from common.atomic import write_bytes
from lottery.grid.robustness_plan import load_robustness_results
from lottery.report.plots import CONTROL_MARKER, CONTROL_STYLE, _figure, palette
from lottery.report.results import ReportData
from lottery.report.stats import fmt_interval, paired, summarize

PLOT = "robust_accuracy_vs_sparsity.png"
LABELS = {"dense": "dense", "none": "ticket", "random_reinit": "reinit", "random_mask": "rand-mask"}


def _attack_name(row: dict[str, Any]) -> str:
    if row.get("attack") == "fgsm":
        return "FGSM"
    restarts = f", {row['restarts']} restarts" if (row.get("restarts") or 1) > 1 else ""
    return f"PGD-{row.get('steps')}{restarts}"


def _key(row: dict[str, Any]) -> tuple:
    """(target sparsity, rewind, retrain mode, control) of a row: the cell a replicate belongs to."""
    sparsity = row.get("target_sparsity")
    if sparsity is None:
        sparsity = row.get("sparsity") or 0.0
    return (round(float(sparsity), 4), row.get("rewind") or "", row.get("retrain_mode") or "weights",
            row.get("control") or "none")


def _cell(values: dict[int, float]) -> str:
    s = summarize(list(values.values()))
    if s.mean is None:
        return "-"
    if s.half_width is None:
        return f"{s.mean:.4f}"
    return f"{s.mean:.4f} ± {s.half_width:.4f} (n={s.n})"


def collect(rows: list[dict[str, Any]]) -> dict[str, dict[tuple, dict[float, dict[int, float]]]]:
    """attack -> cell key -> epsilon -> {replicate: robust accuracy}."""
    out: dict[str, dict[tuple, dict[float, dict[int, float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    for row in rows:
        if row.get("robust_accuracy") is None:
            continue
        out[_attack_name(row)][_key(row)][float(row["epsilon"])][int(row.get("replicate") or 0)] = \
            float(row["robust_accuracy"])
    return out


def robustness_table(cells: dict[tuple, dict[float, dict[int, float]]]) -> str:
    epsilons = sorted({e for per_eps in cells.values() for e in per_eps})
    multi_rewind = len({k[1] for k in cells if k[3] != "dense"}) > 1
    multi_mode = len({k[2] for k in cells if k[3] != "dense"}) > 1
    head = ["sparsity", "network"] + [f"eps {e:g}" for e in epsilons]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], list(LABELS).index(k[3])
                                            if k[3] in LABELS else 9)):
        sparsity, rewind, mode, control = key
        name = LABELS.get(control, control)
        if control != "dense":
            name += (f" @{rewind}" if multi_rewind else "") + (f" [{mode}]" if multi_mode else "")
        lines.append(f"| {sparsity:.2%} | {name} | " +
                     " | ".join(_cell(cells[key].get(e, {})) for e in epsilons) + " |")
    return "\n".join(lines) + "\n"


def paired_robustness_table(cells: dict[tuple, dict[float, dict[int, float]]]) -> str:
    """Ticket minus control over the same replicates, per epsilon ('' without replicates)."""
    lines = []
    for key in sorted(cells):
        sparsity, rewind, mode, control = key
        if control in ("none", "dense"):
            continue
        ticket = cells.get((sparsity, rewind, mode, "none"))
        if not ticket:
            continue
        for eps in sorted(cells[key]):
            if eps not in ticket:
                continue
            p = paired(ticket[eps], cells[key][eps])
            if p.difference.n < 2:
                continue
            lines.append(f"| {sparsity:.2%} | {rewind} | {LABELS.get(control, control)} | {eps:g} | "
                         f"{p.difference.n} | {p.difference.mean:+.4f} | "
                         f"{fmt_interval(p.difference)} | {p.verdict} |")
    if not lines:
        return ""
    head = ("| sparsity | rewind | control | eps | n | ticket - control | 95% CI | verdict |\n"
            "|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(lines) + "\n"


def robustness_plot(name: str, cells: dict[tuple, dict[float, dict[int, float]]]):
    fig, ax = _figure()
    epsilons = sorted({e for per_eps in cells.values() for e in per_eps})
    colours = dict(zip(epsilons, palette(len(epsilons))))
    for eps in epsilons:
        for control in ("none", "random_reinit", "random_mask"):
            pts = sorted((k[0], summarize(list(v[eps].values())).mean) for k, v in cells.items()
                         if k[3] == control and eps in v)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], CONTROL_STYLE[control],
                        marker=CONTROL_MARKER[control], color=colours[eps],
                        label=f"eps {eps:g} {LABELS[control]}")
        dense = [summarize(list(v[eps].values())).mean for k, v in cells.items()
                 if k[3] == "dense" and eps in v]
        if dense:
            ax.axhline(dense[0], color=colours[eps], linestyle=":", linewidth=1)
    ax.set_xlabel("sparsity (fraction of prunable weights removed)")
    ax.set_ylabel(f"accuracy under {name}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Robust accuracy vs sparsity ({name}; dotted: dense)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def robustness_section(data: ReportData) -> tuple[list[str], list[tuple[Path, str]], str]:
    """(report.md lines, [(plot path, caption)], the tables) when robustness results exist."""
    rows = load_robustness_results(data.grid.root)
    if not rows:
        return [], [], ""
    parts = ["## Adversarial robustness", "",
             "Accuracy on the validation split under L-inf attacks (epsilon on the [0, 1] image "
             "scale; the models see pixels in [0, 255], so eps 0.1 = 25.5 grey levels), from "
             "`bigticket lottery robustness` + `lottery run`. Cells: mean over replicates, ± the "
             "95% CI half-width (n) with two or more; eps 0 is the clean accuracy.", ""]
    plots, tables = [], []
    for index, (name, cells) in enumerate(sorted(collect(rows).items())):
        table = robustness_table(cells)
        parts += [f"### {name}", "", table]
        pairs = paired_robustness_table(cells)
        if pairs:
            parts += ["Tickets vs controls, paired over replicates:", "", pairs]
        tables.append(table + pairs)
        buf = io.BytesIO()
        robustness_plot(name, cells).savefig(buf, format="png", dpi=110, bbox_inches="tight")
        path = data.grid.plots / (PLOT if index == 0 else PLOT.replace(".png", f"_{index}.png"))
        write_bytes(path, buf.getvalue())
        plots.append((path, f"Robust accuracy against sparsity under {name}, one colour per "
                            f"epsilon; solid: tickets, dashed/dotted markers: controls; dotted "
                            f"level: the dense model."))
    return parts, plots, "\n".join(tables)
