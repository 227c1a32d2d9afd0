"""Settings of a lottery grid (`bigticket lottery plan`).

What is checked here needs no dense run: ranges, names, exactly one kind of threshold. Whether the
rewind and draw points were saved by the dense run, whether it drew an Early-Bird ticket, the default
retraining epochs and the default channel scope are resolved by `lottery.grid.plan.plan` against the run
directory.

A grid holds magnitude points (sparsities or quantiles x rewind, IMP chains), structured points
(channel_ratios x draw points: channel masks drawn from a checkpoint, compacted, retrained), or both.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

import pydantic

from common.paths import EARLY_BIRD_CHECKPOINT as EARLY_BIRD
from common.settings import settings_dataclass

# 'init', 'final' or a late-reset label of the dense run ('3ep', '500it'): these become file names.
_REWIND = re.compile(r"^(init|final|\d{1,9}(ep|it))$")




def _labels(value, what: str) -> tuple[str, ...]:
    labels = []
    for v in value:
        label = str(v).strip().lower()
        if not _REWIND.match(label):
            raise ValueError(f"{v!r} is not a checkpoint of a dense run (init, final, or e.g. 3ep, "
                             f"500it)")
        labels.append(label)
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate {what} in {list(value)}")
    return tuple(labels)


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
    # Structured (channel) pruning: fraction of channels removed; see lottery.prune.channels.
    channel_ratios: Optional[tuple[float, ...]] = None
    criterion: Literal["l1", "l2", "fpgm", "bn"] = "bn"
    channel_scope: Optional[Literal["layer", "global"]] = None  # None: global for bn, else layer
    draw: tuple[str, ...] = ()                       # checkpoints the channel masks are drawn at
    early_bird: bool = False                         # also draw at the run's Early-Bird ticket
    # Kept channels per layer rounded to a multiple of this (16: the CPU's float32 vector width;
    # narrower layers run far below peak, so unrounded counts cost speed for few FLOPs saved).
    channel_round_to: int = pydantic.Field(default=1, ge=1, le=4096)

    @pydantic.field_validator("sparsities", "quantiles", "channel_ratios", mode="before")
    @classmethod
    def _split_floats(cls, value):
        return _split(value)

    @pydantic.field_validator("rewind", "controls", "exclude", "draw", mode="before")
    @classmethod
    def _split_names(cls, value):
        return _split(value)

    @pydantic.field_validator("sparsities", "quantiles", "channel_ratios")
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
        return _labels(value, "rewind points")

    @pydantic.field_validator("draw")
    @classmethod
    def _draw_labels(cls, value):
        return _labels(value, "draw points")

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
        if (self.sparsities is None and self.quantiles is None and self.imp_rounds == 0
                and self.channel_ratios is None):
            raise ValueError("sparsities/quantiles: give one of them (or imp_rounds > 0 for an "
                             "IMP-only grid, or channel_ratios for a structured grid)")
        return self

    @pydantic.model_validator(mode="after")
    def _structured_complete(self):
        # Half a structured grid is a mistake worth naming, never silently a magnitude-only grid.
        if self.channel_ratios is not None and not self.draw and not self.early_bird:
            raise ValueError("draw: channel_ratios need checkpoints to draw the channel masks from "
                             "(draw, e.g. 10ep,30ep, and/or early_bird)")
        if self.channel_ratios is None and (self.draw or self.early_bird):
            raise ValueError("channel_ratios: draw/early_bird are set but no channel ratios to "
                             "prune at (e.g. 0.3,0.5)")
        return self

    @property
    def structured(self) -> bool:
        return self.channel_ratios is not None

    @property
    def resolved_channel_scope(self) -> str:
        """Network slimming thresholds all BN scales together; weight criteria compare filters
        within a layer (their norms are not comparable across layers)."""
        if self.channel_scope is not None:
            return self.channel_scope
        return "global" if self.criterion == "bn" else "layer"

    @property
    def draw_points(self) -> tuple[str, ...]:
        """Checkpoint names the channel masks are drawn at, the Early-Bird ticket last."""
        return self.draw + ((EARLY_BIRD,) if self.early_bird else ())

    @property
    def thresholds(self) -> tuple[tuple[str, float], ...]:
        """(kind, value) pairs: kind 's' for a sparsity, 'q' for a quantile."""
        if self.sparsities is not None:
            return tuple(("s", v) for v in self.sparsities)
        if self.quantiles is not None:
            return tuple(("q", v) for v in self.quantiles)
        return ()
