"""Fault injection for the elephas reliability tests, driven by BIGTICKET_TEST_TRAIN_FAULT.

The tests must show that a Python worker killed in the middle of a round (training or merging)
is retried by Spark and leaves the round's result unchanged, with a real SIGKILL. The variable
names a marker file holding `<stage> <index> [<after>]`:
- `train <worker_index> <steps>`: the task training that worker kills its Python worker after
  that many steps of the round;
- `merge<level> <task> <inputs>`: that reduce task of the averaging tree (level 1 is the first
  above the workers) kills its Python worker after merging that many inputs.
The first task that matches claims the file by renaming it (to `<file>.fired`, adding its pid),
so exactly one Python worker dies and Spark's retry runs clean. Production runs never set the
variable: one environment lookup per task.
"""
from __future__ import annotations

import os
import signal

ENV = "BIGTICKET_TEST_TRAIN_FAULT"


def armed_fault(stage: str, index: int) -> int | None:
    """How far this task gets before it kills its Python worker; None: it does not."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            fields = f.read().split()
    except FileNotFoundError:
        return None
    if fields[:2] != [stage, str(index)]:
        return None
    try:
        os.rename(path, path + ".fired")  # atomic: one claimant, whatever the races
    except FileNotFoundError:
        return None
    with open(path + ".fired", "a") as f:  # so the test can check this process is gone
        f.write(f" pid={os.getpid()}\n")
    return int(fields[2]) if len(fields) > 2 else 0


def kill_this_worker() -> None:
    """SIGKILL this Python worker, as the kernel's OOM killer would: no cleanup, no exit code."""
    os.kill(os.getpid(), signal.SIGKILL)
