"""Fault injection for the reliability tests, driven by the BIGTICKET_TEST_FAULTS variable.

The tests must show that Spark's task retries leave exact output, with real task failures and real
Python worker deaths. Production runs never set the variable, and then this costs one dict lookup.

Format: `action@stage:partitions[;...]`, e.g. `raise@process:0,2;die@write:1;sleep@write:*=0.5`.
Only a task's first attempt is faulted (so the retry can succeed); `sleep` applies to every attempt.
"""
from __future__ import annotations

import os
import time

ENV = "BIGTICKET_TEST_FAULTS"


def _parse(spec: str) -> list[tuple[str, str, str]]:
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        action, _, rest = part.partition("@")
        stage, _, targets = rest.partition(":")
        rules.append((action, stage, targets))
    return rules


def maybe_fail(stage: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return
    for action, rule_stage, targets in _parse(spec):
        if rule_stage != stage:
            continue
        targets, _, arg = targets.partition("=")
        hit = targets == "*" or str(ctx.partitionId()) in targets.split(",")
        if not hit:
            continue
        if action == "sleep":
            time.sleep(float(arg or 1))
        elif ctx.attemptNumber() == 0:
            if action == "raise":
                raise RuntimeError(f"injected fault in {stage} partition {ctx.partitionId()}")
            if action == "die":
                os._exit(17)  # a Python worker dying mid-task, as an OOM kill would
