"""A grid task: one schedulable unit of work, validated once when it is read.

Planned by `lottery.grid.plan` into the grid's settings.json, handed out by the scheduler, run by
the runner registered for its `kind` (lottery.points.runners), and copied into its result file.
Every field is a JSON value; `to_dict` gives back exactly the stored form.

    task_id      unique, a safe file name: names results/<task_id>.json and claims/<task_id>.claim
    kind         "oneshot" (one mask, one retraining), "imp" (a chain of imp_rounds rounds),
                 "structured" (channels removed, the network compacted, retrained), or the name of
                 a custom executor's kind (benchmark workloads)
    mask_id      masks/<mask_id>.npz to apply (None for imp: the chain makes its own)
    base_mask_id for control random_mask: the magnitude mask whose per-layer sparsity it copies
    rewind       checkpoint of the dense run to start from: init, final, 3ep, 500it, early_bird
    control      "none", "random_reinit" (same mask, fresh init) or "random_mask"
    scope        "global" or "layer"
    threshold    {"kind": "sparsity" | "quantile", "value": float}, None for imp and structured
    sparsity     target sparsity (oneshot: the mask's real sparsity; imp: after the last round)
    exclude      weight-name patterns never pruned
    epochs       retraining epochs per round (None: the dense run's)
    imp_rounds   rounds of the chain (0 unless imp); imp_rate: fraction pruned per round
    seed         per-task seed (random re-init, data order)
    cost         estimated cost in epochs of training; larger runs first
    ratio, criterion, draw_epoch, round_to   structured tasks only: the fraction of channels
                 removed, the channel criterion, where the draw checkpoint sits (epochs), and the
                 multiple kept channels are rounded to (left out when 1)
    params       free-form JSON object for custom executors (e.g. a workload's duration)
    replicate    0, 1, ...: replicate r >= 1 of a point has its own seed, its own data order (shared
                 by every task of that replicate, so tickets and controls pair up) and its own
                 random controls; its id ends in -rep<r>. Left out when 0
    retrain_mode "weights" (rewind the weights), "lr" (final weights, masked, the learning-rate
                 schedule replayed from `rewind`) or "finetune" (final weights, masked, a constant
                 rate); its id ends in -<mode> unless weights. Left out when "weights"
    run          the dense run this task retrains (a directory name, sibling of the grid's own
                 run) for grids over replicate dense runs (GridSettings.replicate_runs); None:
                 the grid's run. Left out when None
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from common.paths import is_safe_name

CONTROLS = ("none", "random_reinit", "random_mask")
RETRAIN_MODES = ("weights", "lr", "finetune")
THRESHOLD_KINDS = ("sparsity", "quantile")

# Fields stored only when set (older plans and other kinds of task do not have them).
_OPTIONAL = ("ratio", "criterion", "draw_epoch", "round_to", "params")
# Fields stored only when not at their default, so plans written before them stay byte-identical.
_DEFAULT_OMITTED = {"replicate": 0, "retrain_mode": "weights", "run": None}


# Copied into every result beside the point's measurements (the task's sparsity as target_sparsity).
_IN_RESULTS = ("task_id", "kind", "mask_id", "base_mask_id", "rewind", "control", "scope", "threshold",
               "imp_rounds", "imp_rate", "seed", "replicate", "retrain_mode", "run")


class TaskError(ValueError):
    """A task that does not validate; the message names the task and the field."""


@dataclasses.dataclass(frozen=True)
class Task:
    task_id: str
    kind: str = "oneshot"
    mask_id: str | None = None
    base_mask_id: str | None = None
    rewind: str = "init"
    control: str = "none"
    scope: str = "global"
    threshold: Mapping[str, Any] | None = None
    sparsity: float | None = None
    exclude: tuple[str, ...] = ()
    epochs: int | None = None
    imp_rounds: int = 0
    imp_rate: float = 0.0
    seed: int = 0
    cost: float = 1.0
    ratio: float | None = None
    criterion: str | None = None
    draw_epoch: float | None = None
    round_to: int | None = None
    params: Mapping[str, Any] | None = None
    replicate: int = 0
    retrain_mode: str = "weights"
    run: str | None = None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> TaskError:
            return TaskError(f"task {self.task_id!r}: field {field} {why}")

        if not isinstance(self.task_id, str) or not is_safe_name(self.task_id):
            raise bad("task_id", "is not a safe file name")
        for field in ("kind", "rewind", "control", "scope"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise bad(field, f"must be a non-empty string, got {getattr(self, field)!r}")
        for field in ("mask_id", "base_mask_id", "run"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not is_safe_name(value)):
                raise bad(field, f"{value!r} is not a safe file name")  # becomes masks/<id>.npz
        if self.control not in CONTROLS:
            raise bad("control", f"is {self.control!r}, expected one of {CONTROLS}")
        if self.threshold is not None and (not isinstance(self.threshold, Mapping)
                                           or self.threshold.get("kind") not in THRESHOLD_KINDS):
            raise bad("threshold", f"must be {{'kind': {'|'.join(THRESHOLD_KINDS)}, 'value': ...}}")
        if isinstance(self.exclude, (str, bytes)) or not all(isinstance(p, str) for p in self.exclude):
            raise bad("exclude", "must be a list of weight-name patterns")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.retrain_mode not in RETRAIN_MODES:
            raise bad("retrain_mode", f"is {self.retrain_mode!r}, expected one of {RETRAIN_MODES}")
        if isinstance(self.replicate, bool) or not isinstance(self.replicate, int) or self.replicate < 0:
            raise bad("replicate", f"must be an integer >= 0, got {self.replicate!r}")
        for field in ("epochs", "imp_rounds", "seed", "round_to"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(field, f"must be an integer, got {value!r}")
        for field in ("sparsity", "imp_rate", "cost", "ratio", "draw_epoch"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise bad(field, f"must be a number, got {value!r}")
        if self.params is not None and not isinstance(self.params, Mapping):
            raise bad("params", "must be a JSON object")

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "Task":
        if not isinstance(record, Mapping):
            raise TaskError(f"a task must be a JSON object, got {type(record).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise TaskError(f"task {record.get('task_id', '?')!r}: unknown field(s) {unknown} "
                            f"(custom executors put their own values under 'params')")
        if "task_id" not in record:
            raise TaskError("a task has no field task_id")
        return cls(**dict(record))

    def require(self, *fields: str) -> None:
        """TaskError naming the task and the first of `fields` that is not set (what a kind of
        task needs beyond the fields every task has)."""
        for field in fields:
            if getattr(self, field) is None:
                raise TaskError(f"task {self.task_id!r}: field {field} is missing (a {self.kind} task "
                                f"needs {', '.join(fields)})")

    def result_fields(self) -> dict[str, Any]:
        """The task's fields every result row carries (the report reads them from the result)."""
        stored = {**_DEFAULT_OMITTED, **self.to_dict()}
        return {k: stored[k] for k in _IN_RESULTS} | {"target_sparsity": self.sparsity}

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value is None:
                continue
            if f.name in _DEFAULT_OMITTED and value == _DEFAULT_OMITTED[f.name]:
                continue
            out[f.name] = list(value) if f.name == "exclude" else value
        return out
