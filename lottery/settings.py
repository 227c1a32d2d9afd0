"""Settings of a lottery grid (`bigticket lottery plan`).

What is checked here needs no dense run: ranges, names, exactly one kind of threshold. Whether the
rewind points were saved by the dense run, and the default retraining epochs, are resolved by
`lottery.grid.plan` against the run directory.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

import pydantic

from common.settings import settings_dataclass

# 'init', 'final' or a late-reset label of the dense run ('3ep', '500it'): these become file names.
_REWIND = re.compile(r"^(init|final|\d{1,9}(ep|it))$")


def _split(value):
    """'0.5,0.7' from a flag or a config file -> ['0.5', '0.7']; lists pass through."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


@settings_dataclass
class GridSettings:
    sparsities: Optional[tuple[float, ...]] = None   # fraction of prunable weights set to zero
    quantiles: Optional[tuple[float, ...]] = None    # magnitude quantile used as the threshold
    scope: Literal["global", "layer"] = "global"     # one threshold overall, or per layer
    rewind: tuple[str, ...] = ("init",)              # saved points of the dense run
    controls: tuple[Literal["random_reinit", "random_mask"], ...] = ()
    imp_rounds: int = pydantic.Field(default=0, ge=0, le=100)   # 0: no IMP chains
    imp_rate: float = pydantic.Field(default=0.2, gt=0, lt=1)   # fraction of REMAINING pruned/round
    exclude: tuple[str, ...] = ()                    # weight-name patterns never pruned (fnmatch)
    epochs: Optional[int] = pydantic.Field(default=None, ge=1, le=100_000)  # None: dense run's
    seed: int = 0

    @pydantic.field_validator("sparsities", "quantiles", mode="before")
    @classmethod
    def _split_floats(cls, value):
        return _split(value)

    @pydantic.field_validator("rewind", "controls", "exclude", mode="before")
    @classmethod
    def _split_names(cls, value):
        return _split(value)

    @pydantic.field_validator("sparsities", "quantiles")
    @classmethod
    def _fractions(cls, value, info):
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one value")
        for v in value:
            if not 0.0 < v < 1.0:
                raise ValueError(f"{v} must lie strictly between 0 and 1")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate values in {list(value)}")
        # Ids are built from 4 decimals: two values that differ only beyond that would collide.
        if len({round(v, 4) for v in value}) != len(value):
            raise ValueError(f"values must differ in the first 4 decimals: {list(value)}")
        return value

    @pydantic.field_validator("rewind")
    @classmethod
    def _rewind_labels(cls, value):
        if not value:
            raise ValueError("give at least one rewind point")
        labels = []
        for v in value:
            label = str(v).strip().lower()
            if not _REWIND.match(label):
                raise ValueError(f"{v!r} is not a rewind point (init, final, or e.g. 3ep, 500it)")
            labels.append(label)
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate rewind points in {list(value)}")
        return tuple(labels)

    @pydantic.field_validator("controls")
    @classmethod
    def _unique_controls(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate controls in {list(value)}")
        return value

    @pydantic.model_validator(mode="after")
    def _one_threshold_kind(self):
        if self.sparsities is not None and self.quantiles is not None:
            raise ValueError("sparsities/quantiles: give exactly one of them, not both")
        if self.sparsities is None and self.quantiles is None and self.imp_rounds == 0:
            raise ValueError("sparsities/quantiles: give one of them (or imp_rounds > 0 for an "
                             "IMP-only grid)")
        return self

    @property
    def thresholds(self) -> tuple[tuple[str, float], ...]:
        """(kind, value) pairs: kind 's' for a sparsity, 'q' for a quantile."""
        if self.sparsities is not None:
            return tuple(("s", v) for v in self.sparsities)
        if self.quantiles is not None:
            return tuple(("q", v) for v in self.quantiles)
        return ()
