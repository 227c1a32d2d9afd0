"""Sparsity schedules of gradual magnitude pruning (GMP): what sparsity the masks have at a step.

Steps are the dense run's own global step counter (batches trained since the start of the run,
persisted with every epoch's resume state), never `optimizer.iterations`, which stands still on a
step skipped by loss scaling. "An update at step t" happens after t steps have been trained and
before step t + 1; t = 0 is before the first batch.

polynomial (Zhu & Gupta 2017):

    p = clamp((t - begin) / (end - begin), 0, 1)
    s(t) = final + (initial - final) * (1 - p) ** power

constant: s(t) = final from `begin` on.

Masks are recomputed at the update steps begin, begin + frequency, begin + 2 * frequency, ...
while <= end, and frozen after `end`. When end - begin is not a multiple of frequency, the last of
those falls short of `end` and the schedule would stop below its final sparsity (the trap of the
reference implementation): here one more update is forced at `end` itself, so the final sparsity
is always reached exactly. Pure Python; no TensorFlow.
"""
from __future__ import annotations

import dataclasses

KINDS = ("constant", "polynomial")


@dataclasses.dataclass(frozen=True)
class SparsitySchedule:
    kind: str
    initial: float
    final: float
    begin: int
    end: int
    power: float = 3.0
    frequency: int = 100

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"gmp_schedule: {self.kind!r} is not one of {', '.join(KINDS)}")
        if not 0.0 <= self.initial < 1.0:
            raise ValueError(f"gmp_initial_sparsity: {self.initial} must be in [0, 1)")
        if not 0.0 <= self.final < 1.0:
            raise ValueError(f"gmp_final_sparsity: {self.final} must be in [0, 1)")
        if self.kind == "polynomial" and self.final < self.initial:
            raise ValueError(f"gmp_final_sparsity: {self.final} is below gmp_initial_sparsity "
                             f"{self.initial} (masks only grow)")
        if self.begin < 0:
            raise ValueError(f"gmp_begin_step: {self.begin} must be >= 0")
        if self.end <= self.begin:
            raise ValueError(f"gmp_end_step: {self.end} must be after gmp_begin_step ({self.begin})")
        if self.frequency < 1:
            raise ValueError(f"gmp_frequency: {self.frequency} must be >= 1")
        if self.power <= 0:
            raise ValueError(f"gmp_power: {self.power} must be > 0")

    def sparsity(self, step: int) -> float:
        """Target sparsity of the masks set at `step` (0 before `begin`)."""
        if step < self.begin:
            return 0.0
        if self.kind == "constant":
            return self.final
        p = min(max((step - self.begin) / (self.end - self.begin), 0.0), 1.0)
        return self.final + (self.initial - self.final) * (1.0 - p) ** self.power

    def update_steps(self) -> list[int]:
        """Every step at which masks are recomputed, in order (end always included)."""
        steps = list(range(self.begin, self.end + 1, self.frequency))
        if steps[-1] != self.end:
            steps.append(self.end)  # the forced last update (module docstring)
        return steps

    def is_update_step(self, step: int) -> bool:
        if step < self.begin or step > self.end:
            return False
        return step == self.end or (step - self.begin) % self.frequency == 0

    def last_update_at_or_before(self, step: int) -> int | None:
        """The latest update step <= `step` (None before `begin`)."""
        if step < self.begin:
            return None
        if step >= self.end:
            return self.end
        return self.begin + (step - self.begin) // self.frequency * self.frequency

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "update_steps": len(self.update_steps())}


def schedule_from_settings(settings, total_steps: int) -> SparsitySchedule | None:
    """The schedule of a DenseSettings (None: no GMP); end defaults to the last step."""
    if settings.gmp_schedule == "none":
        return None
    end = settings.gmp_end_step if settings.gmp_end_step is not None else total_steps
    if end > total_steps:
        raise ValueError(f"gmp_end_step: {end} is past the end of training ({total_steps} steps)")
    return SparsitySchedule(settings.gmp_schedule, settings.gmp_initial_sparsity,
                            settings.gmp_final_sparsity, settings.gmp_begin_step, end,
                            settings.gmp_power, settings.gmp_frequency)


# DenseSettings' GMP fields at their defaults, as settings.json stores them (tuples as lists):
# left out of a run's identity, so older runs keep their names (train.settings.LATER_FIELD_DEFAULTS).
GMP_DEFAULTS = {"gmp_schedule": "none", "gmp_initial_sparsity": 0.0, "gmp_final_sparsity": None,
                "gmp_begin_step": 0, "gmp_end_step": None, "gmp_power": 3.0, "gmp_frequency": 100,
                "gmp_scope": "global", "gmp_exclude": [], "gmp_prune_depthwise": False}


def check_settings(settings) -> None:
    """The GMP checks a DenseSettings can make alone (ValueError naming the field); the end step
    against the length of training is checked once steps per epoch are known."""
    if settings.gmp_schedule == "none":
        changed = [k for k, v in GMP_DEFAULTS.items()  # (gmp_exclude: a list as stored)
                   if k != "gmp_schedule" and getattr(settings, k) != (tuple(v) if isinstance(v, list) else v)]
        if changed:
            raise ValueError(f"{changed[0]}: a GMP setting, but gmp_schedule is 'none' "
                             f"(set --gmp-schedule polynomial or constant)")
        return
    if settings.gmp_final_sparsity is None:
        raise ValueError(f"gmp_final_sparsity: required with gmp_schedule {settings.gmp_schedule!r}")
    if settings.gmp_schedule == "constant" and settings.gmp_initial_sparsity != 0.0:
        raise ValueError("gmp_initial_sparsity: the constant schedule has only gmp_final_sparsity")
    end = settings.gmp_end_step if settings.gmp_end_step is not None else settings.gmp_begin_step + 1
    # Builds and so checks the schedule (final < initial, end <= begin, ...); end checked later.
    SparsitySchedule(settings.gmp_schedule, settings.gmp_initial_sparsity, settings.gmp_final_sparsity,
                     settings.gmp_begin_step, end, settings.gmp_power, settings.gmp_frequency)
