"""The progress of a running grid (`lottery status`): points done, live claims and an ETA, from files alone."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from common.paths import GridPaths
from lottery.grid.claims import DEFAULT_STALE_AFTER, list_claims
from lottery.grid.plan import done_ids, load_plan
from lottery.report.results import number, read_result_or_warn


def grid_progress(grid_dir: str | os.PathLike, stale_after: float = DEFAULT_STALE_AFTER) -> dict:
    """Points done/total, running claims and an ETA, from the files alone.

    A point with a result file is done (the scheduler will not run it again) even when the file is
    damaged; such a file is named in a warning and left out of the ETA. A point with a live claim
    is running (with the rank and host its claim names), the others are pending.
    """
    grid = GridPaths(Path(grid_dir))
    tasks = load_plan(grid.root)["tasks"]
    cost = {t.task_id: float(t.cost or 1.0) for t in tasks}
    done = done_ids(grid) & set(cost)
    claims = [c for c in list_claims(grid, stale_after) if c.task_id in cost and c.task_id not in done]
    running = [c for c in claims if not c.stale]
    seconds_per_cost = []
    for task_id in sorted(done):
        record = read_result_or_warn(grid.result(task_id))
        wall = None if record is None else number(record.get("wall_time"))
        if wall is not None:
            seconds_per_cost.append((wall, cost[task_id]))
    remaining_cost = sum(c for t, c in cost.items() if t not in done)
    eta = 0.0 if not remaining_cost else None
    if seconds_per_cost and remaining_cost:
        rate = sum(w for w, _ in seconds_per_cost) / max(sum(c for _, c in seconds_per_cost), 1e-9)
        eta = remaining_cost * rate / max(1, len(running))
    return {"grid": str(grid.root), "total": len(tasks), "done": len(done),
            "remaining": len(tasks) - len(done),
            "pending": len(tasks) - len(done) - len(running),
            "running": [{"task_id": c.task_id, "owner": c.owner, "host": c.host, "pid": c.pid,
                         "rank": c.rank, "heartbeat_age_s": round(c.age, 1)} for c in running],
            "stale_claims": [c.task_id for c in claims if c.stale],
            "eta_seconds": None if eta is None else round(eta, 1)}


def format_progress(p: Mapping[str, Any]) -> str:
    """The text `lottery status` prints for grid_progress's dict."""
    eta = p["eta_seconds"]
    remaining = p["total"] - p["done"]
    eta_text = ("0s (complete)" if remaining == 0 else
                "unknown (no point finished yet)" if eta is None else _duration(eta))
    lines = [f"grid {p['grid']}",
             f"points done: {p['done']}/{p['total']} ({len(p['running'])} running, "
             f"{p['pending']} pending)",
             f"running: {len(p['running'])} claim(s)",
             f"ETA: {eta_text}" + (f" with {max(1, len(p['running']))} worker(s)" if remaining else "")]
    for r in p["running"]:
        lines.append(f"  {r['task_id']}  {_where(r)}  (heartbeat {r['heartbeat_age_s']} s ago)")
    if p["stale_claims"]:
        lines.append(f"stale claims (dead workers, will be reclaimed): {', '.join(p['stale_claims'])}")
    return "\n".join(lines)


def _where(running: Mapping[str, Any]) -> str:
    """'rank 2 on node07 (pid 4242)', or 'on node07 (pid 4242)' outside MPI."""
    host = running.get("host") or running["owner"]
    pid = f" (pid {running['pid']})" if running.get("pid") is not None else ""
    rank = f"rank {running['rank']} " if running.get("rank") is not None else ""
    return f"{rank}on {host}{pid}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
