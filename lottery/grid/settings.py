"""Settings of a lottery grid (`bigticket lottery plan`).

What is checked here needs no dense run: ranges, names, exactly one kind of threshold. Whether the
rewind and draw points were saved by the dense run, whether it drew an Early-Bird ticket, the default
retraining epochs and the default channel scope are resolved by `lottery.grid.plan.plan` against the run
directory.

A grid holds magnitude points (sparsities or quantiles x rewind, IMP chains), structured points
(channel_ratios x draw points: channel masks drawn from a checkpoint, compacted, retrained), or both.
"""
from __future__ import annotations

from typing import Literal, Optional

import pydantic

from common.paths import EARLY_BIRD_CHECKPOINT as EARLY_BIRD
from common.paths import is_safe_name
from common.settings import settings_dataclass
from lottery.grid.ids import fraction_tag
from lottery.grid.plan_gmp import check_gmp_sparsities
from lottery.points.task import CONTROLS, RETRAIN_MODES
from lottery.prune.criteria import CRITERIA
from lottery.prune.masks import SCOPES
from train.adversarial import ADVERSARIAL_MODES
from train.adversarial import check_settings as check_adversarial
from train.checkpoints import is_checkpoint_label


def _labels(value, what: str) -> tuple[str, ...]:
    """Checkpoint labels of a dense run ('init', 'final', '3ep', '500it'): they become file names."""
    labels = []
    for v in value:
        label = str(v).strip().lower()
        if not is_checkpoint_label(label):
            raise ValueError(f"{v!r} is not a checkpoint of a dense run (init, final, or e.g. 3ep, "
                             f"500it)")
        labels.append(label)
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate {what} in {list(value)}")
    return tuple(labels)


def _split(value):
    """'0.5,0.7' from a config file -> ['0.5', '0.7']; lists pass through."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


@settings_dataclass
class GridSettings:
    sparsities: Optional[tuple[float, ...]] = pydantic.Field(
        default=None, description="target sparsities (fraction of prunable weights set to zero), "
                                  "e.g. 0.5,0.7,0.9")
    quantiles: Optional[tuple[float, ...]] = pydantic.Field(
        default=None, description="magnitude quantiles used as thresholds")
    scope: Literal[SCOPES] = pydantic.Field(
        default="global", description="one threshold over all weights, or one per layer")
    rewind: tuple[str, ...] = pydantic.Field(
        default=("init",), description="saved points of the dense run, e.g. init,1ep,final")
    controls: tuple[Literal[tuple(c for c in CONTROLS if c != "none")], ...] = pydantic.Field(
        default=(), description="control points beside each magnitude point")
    imp_rounds: int = pydantic.Field(default=0, ge=0, le=100,
                                     description="rounds of iterative magnitude pruning; 0: none")
    imp_rate: float = pydantic.Field(default=0.2, gt=0, lt=1,
                                     description="fraction of the REMAINING weights pruned per round")
    exclude: tuple[str, ...] = pydantic.Field(
        default=(), description="weight-name patterns never pruned (fnmatch), comma-separated")
    epochs: Optional[int] = pydantic.Field(
        default=None, ge=1, le=100_000,
        description="retraining epochs (default: the dense run's). With fewer, the default "
                    "--lr-schedule-from rewind replays only that many epochs of the dense "
                    "learning-rate schedule from the rewind point, so it stops before the schedule "
                    "anneals; --lr-schedule-from fresh fits the whole schedule into them")
    lr_schedule_from: Literal["rewind", "fresh"] = pydantic.Field(
        default="rewind",
        description="retraining learning rate: rewind = the dense run's schedule continued from "
                    "the rewind point (structured points: from its start) for --epochs epochs; "
                    "fresh = the whole dense schedule compressed (or stretched) into --epochs, "
                    "from its first rate to its last")
    seed: int = pydantic.Field(default=0, description="seed the per-task seeds derive from")
    # Structured (channel) pruning: fraction of channels removed; see lottery.prune.channel_masks.
    channel_ratios: Optional[tuple[float, ...]] = pydantic.Field(
        default=None, description="fractions of the channels to remove, e.g. 0.3,0.5")
    criterion: Literal[CRITERIA] = pydantic.Field(
        default="bn", description="channel importance (bn: BatchNorm scale)")
    channel_scope: Optional[Literal[SCOPES]] = pydantic.Field(
        default=None, description="one threshold over all channels or per layer (default: global "
                                  "for bn, layer otherwise)")
    draw: tuple[str, ...] = pydantic.Field(
        default=(), description="dense-run checkpoints to draw channel masks at, e.g. 10ep,30ep")
    early_bird: bool = pydantic.Field(
        default=False, description="also draw at the dense run's Early-Bird ticket "
                                   "(--no-early-bird turns a preset's off)")
    # Replicates and retraining modes (issue 13). Both are left out of the grid's directory name
    # (lottery.grid.plan.EXTENSIBLE_FIELDS): planning a finished grid again with more replicates or
    # another mode extends its task list, so only the new points run.
    replicates: int = pydantic.Field(
        default=1, ge=1, le=1000,
        description="replicates per point: replicate r >= 1 draws its own data order and its own "
                    "random controls (ids end in -rep<r>); replicate 0 keeps today's ids")
    retrain_modes: tuple[Literal[RETRAIN_MODES], ...] = pydantic.Field(
        default=("weights",),
        description="how one-shot masks are retrained: weights (rewind the weights: the lottery "
                    "ticket), lr (the dense run's final weights, masked, with the learning-rate "
                    "schedule replayed from the rewind point), finetune (final weights, masked, "
                    "constant --finetune-lr)")
    replicate_runs: tuple[str, ...] = pydantic.Field(
        default=(),
        description="dense runs of the same configuration with other seeds (directory names, "
                    "siblings of --run): replicate r uses the r-th, its own masks and checkpoints. "
                    "`lottery plan --run R0 --run R1 --run R2` sets it")
    finetune_lr: Optional[float] = pydantic.Field(
        default=None, gt=0, le=10,
        description="learning rate of retrain mode finetune (default: the dense schedule's rate "
                    "in its last epoch)")
    # Kept channels per layer rounded to a multiple of this (16: the CPU's float32 vector width;
    # narrower layers run far below peak, so unrounded counts cost speed for few FLOPs saved).
    channel_round_to: int = pydantic.Field(
        default=1, ge=1, le=4096, description="keep a multiple of N channels per layer (e.g. 16)")
    # Adversarial retraining of the points (train.adversarial; out of the identity at defaults).
    adversarial: Literal[ADVERSARIAL_MODES] = pydantic.Field(
        default="none", description="retrain points on PGD (Madry et al.) or FGSM examples")
    adv_epsilon: float = pydantic.Field(
        default=0.0, ge=0, le=1, description="adversarial retraining: L-inf radius, [0, 1] scale")
    adv_steps: int = pydantic.Field(default=7, ge=1, le=1000,
                                    description="adversarial retraining: PGD steps per batch")
    adv_step_size: Optional[float] = pydantic.Field(
        default=None, gt=0, le=1, description="adversarial retraining: PGD step, [0, 1] scale "
                                              "(default 2.5 * eps / steps)")
    adv_random_start: bool = pydantic.Field(
        default=True, description="adversarial retraining: PGD starts at a random point")
    # BatchNorm recalibration of each point after retraining (lottery.points.point_metrics;
    # out of the identity at its defaults).
    bn_recalibration: Literal["auto", "on", "off"] = pydantic.Field(
        default="auto", description="recompute a point's BatchNorm statistics from training "
                                    "batches after retraining under its mask; auto: models with "
                                    "BatchNorm")
    bn_recalibration_batches: int = pydantic.Field(
        default=20, ge=1, le=100_000, description="training batches per recalibration")
    # GMP points (lottery.grid.plan_gmp; out of the identity when empty).
    gmp_sparsities: tuple[float, ...] = pydantic.Field(
        default=(), description="also train one gradual-magnitude-pruning point per final "
                                "sparsity, e.g. 0.9,0.97 (kind gmp, from init)")

    @pydantic.field_validator("sparsities", "quantiles", "channel_ratios", mode="before")
    @classmethod
    def _split_floats(cls, value):
        return _split(value)

    @pydantic.field_validator("gmp_sparsities", mode="before")
    @classmethod
    def _split_gmp(cls, value):
        return _split(value)

    @pydantic.field_validator("gmp_sparsities")
    @classmethod
    def _check_gmp(cls, value):
        return check_gmp_sparsities(value)

    @pydantic.field_validator("rewind", "controls", "exclude", "draw", "retrain_modes",
                              "replicate_runs", mode="before")
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
        # Values enter task and mask ids as 4-digit tags: two values with one tag would collide.
        tags = [fraction_tag(v) for v in value]
        if len(set(tags)) != len(tags):
            raise ValueError(f"values must differ in the first 4 decimals: {list(value)} give the "
                             f"id tags {tags}")
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

    @pydantic.field_validator("retrain_modes")
    @classmethod
    def _modes(cls, value):
        if not value:
            raise ValueError("give at least one retraining mode (weights, lr, finetune)")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate retraining modes in {list(value)}")
        return tuple(m for m in RETRAIN_MODES if m in value)  # one order: ids and plans stable

    @pydantic.model_validator(mode="after")
    def _one_threshold_kind(self):
        check_adversarial(self)  # adv_epsilon > 0 when adversarial
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
        if self.retrain_modes != ("weights",) and self.thresholds == ():
            raise ValueError("retrain_modes: lr and finetune retrain one-shot masks; give "
                             "sparsities or quantiles")
        if self.replicate_runs:
            if self.replicates not in (1, 1 + len(self.replicate_runs)):  # 1: the plan sets it
                raise ValueError(f"replicates: {self.replicates}, but replicate_runs gives "
                                 f"{1 + len(self.replicate_runs)} dense runs (one per replicate)")
            if len(set(self.replicate_runs)) != len(self.replicate_runs):
                raise ValueError(f"replicate_runs: duplicate runs in {list(self.replicate_runs)}")
            if not all(is_safe_name(r) for r in self.replicate_runs):
                raise ValueError(f"replicate_runs: give directory names (siblings of --run), got "
                                 f"{list(self.replicate_runs)}")
            if self.channel_ratios is not None:
                raise ValueError("replicate_runs: structured grids over several dense runs are "
                                 "not supported; plan one grid per dense run")
        if self.finetune_lr is not None and "finetune" not in self.retrain_modes:
            raise ValueError("finetune_lr: set, but retrain_modes has no finetune")
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
