"""The report's GMP section: gradual-magnitude-pruning points next to one-shot tickets at the same
target sparsity (lottery.grid.plan_gmp plans the points, lottery.points.gmp trains them)."""
from __future__ import annotations

from typing import Any

GMP_NOTE = ("GMP: masks grown by magnitude while training from init (polynomial schedule, power 3, "
            "final sparsity at 75% of the steps, then fine-tuned with the masks frozen); ticket: "
            "the one-shot magnitude mask of the same target sparsity, rewound to init, control "
            "none. Both with the dense run's recipe and epochs; replicates averaged.")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def gmp_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per GMP target sparsity: real sparsity, GMP accuracy, the ticket's."""
    gmp = [r for r in rows if r["kind"] == "gmp"]
    if not gmp:
        return ""
    targets = sorted({r["threshold_value"] for r in gmp if r.get("threshold_value") is not None})
    lines = ["| target sparsity | GMP sparsity | GMP accuracy | ticket accuracy (init) | GMP - ticket |",
             "|---:|---:|---:|---:|---:|"]
    for target in targets:
        mine = [r for r in gmp if r.get("threshold_value") == target]
        tickets = [r for r in rows if r["kind"] == "oneshot" and r.get("control") == "none"
                   and r.get("rewind") == "init" and (r.get("retrain_mode") or "weights") == "weights"
                   and r.get("threshold_kind") == "sparsity" and r.get("threshold_value") == target]
        acc = _mean([r["accuracy"] for r in mine])
        ticket = _mean([r["accuracy"] for r in tickets])
        diff = None if acc is None or ticket is None else acc - ticket
        lines.append(f"| {target:.4f} | {_fmt(_mean([r['sparsity'] for r in mine]))} | {_fmt(acc)} | "
                     f"{_fmt(ticket)} | {'—' if diff is None else f'{diff:+.4f}'} |")
    return "\n".join(lines) + "\n"
