"""Settings of a dense training run (`bigticket train dense`).

Validation here is what can be checked without reading the dataset (names, ranges, rewind
syntax); `train.run.resolve_settings` adds the checks that need the dataset (rewind points past
the end of training, classes vs model, input size) before any training starts.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

import pydantic

from common.settings import settings_dataclass

ENGINES = ("elephas", "local", "multiworker")
# Fields added after the first runs, with the defaults that left them out of the identity hash.
LATER_FIELD_DEFAULTS = {"bn_l1": 0.0, "early_bird": False, "early_bird_ratio": 0.5,
                        "early_bird_window": 5, "early_bird_threshold": 0.1,
                        "stop_at_early_bird": False}
# Fields that say where things are or how they are launched, not what is computed: they are
# left out of the run's identity hash (the dataset is identified by its manifest's sha256).
NON_IDENTITY_FIELDS = ("data", "out", "master")


@settings_dataclass
class DenseSettings:
    data: str                                   # dataset directory (etl output)
    model: str                                  # a name of train.models.MODELS
    out: str = "runs"                           # runs root: the run is out/dense-<hash>
    model_options: dict[str, Any] = pydantic.Field(default_factory=dict)
    engine: Literal["elephas", "local", "multiworker"] = "local"
    epochs: int = pydantic.Field(default=10, ge=1, le=100_000)
    rewind: tuple[str, ...] = ()                # late-reset points: "0ep", "3ep", "500it"
    batch_size: int = pydantic.Field(default=64, ge=1, le=1_000_000)  # per worker / replica group
    lr: float = pydantic.Field(default=0.05, gt=0, le=100)
    lr_schedule: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = pydantic.Field(default=0.0, ge=0)
    lr_decay_epochs: tuple[int, ...] = ()       # step schedule: multiply by lr_decay_factor at each
    lr_decay_factor: float = pydantic.Field(default=0.1, gt=0, le=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = pydantic.Field(default=0.9, ge=0, lt=1)   # sgd only
    weight_decay: float = pydantic.Field(default=0.0, ge=0)     # decoupled (Keras optimizer)
    seed: int = 0
    workers: int = pydantic.Field(default=1, ge=1, le=100_000)  # elephas: Spark tasks per round
    averaging: Union[Literal["epoch"], pydantic.PositiveInt] = "epoch"  # elephas: or every K steps
    early_stopping_patience: int = pydantic.Field(default=0, ge=0)  # epochs; 0 = off
    early_stopping_metric: Literal["val_loss", "val_accuracy"] = "val_loss"
    mixed_precision: bool = False               # mixed_float16 when a GPU is visible, else ignored
    deterministic: bool = True                  # tf op determinism: resumed == uninterrupted
    input_size: Optional[int] = pydantic.Field(default=None, ge=1, le=4096)  # None: dataset's
    format: Optional[Literal["tfrecord", "parquet"]] = None   # None: tfrecord if present
    augment: Literal["none", "crop", "crop_flip"] = "crop_flip"  # training only; digits: "crop"
    num_classes: Optional[int] = pydantic.Field(default=None, ge=2)  # None: the dataset's; else must match
    cache: bool = True                          # cache encoded bytes in memory across epochs
    shuffle_buffer: int = pydantic.Field(default=10_000, ge=1)
    master: Optional[str] = None                # Spark master for elephas (None: spark-submit's)
    # Network slimming / Early-Bird (issue 6). Added after the first runs: at their defaults they
    # are left out of the run's identity (train.run.run_hash), so older runs keep their names.
    bn_l1: float = pydantic.Field(default=0.0, ge=0, le=1)   # L1 penalty on every BN gamma
    early_bird: bool = False                    # per-epoch BN channel mask + Early-Bird detector
    early_bird_ratio: float = pydantic.Field(default=0.5, gt=0, lt=1)  # channels pruned by the mask
    early_bird_window: int = pydantic.Field(default=5, ge=2, le=10_000)  # consecutive masks compared
    early_bird_threshold: float = pydantic.Field(default=0.1, gt=0, le=1)  # max Hamming distance
    stop_at_early_bird: bool = False            # end dense training once the ticket is drawn

    @pydantic.field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from train.models import check_model_name

        check_model_name(value)
        return value

    @pydantic.field_validator("rewind", mode="before")
    @classmethod
    def _split_rewind(cls, value):
        if isinstance(value, str):  # "0ep,3ep,500it" from a flag or a config file
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @pydantic.field_validator("rewind")
    @classmethod
    def _check_rewind(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from train.checkpoints import RewindPoint

        points = [RewindPoint.parse(v) for v in value]  # ValueError names the bad point
        labels = [p.label for p in points]
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate rewind points in {list(value)}")
        return tuple(labels)

    @pydantic.model_validator(mode="after")
    def _check(self):
        from train.models import BATCHNORM_MODELS, check_model_options, has_batchnorm

        check_model_options(self.model, self.model_options)  # message names model_options
        if (self.early_bird or self.bn_l1 > 0) and not has_batchnorm(self.model):
            field = "early_bird" if self.early_bird else "bn_l1"
            raise ValueError(f"{field}: model {self.model!r} has no BatchNorm layers (models with "
                             f"BatchNorm: {', '.join(sorted(BATCHNORM_MODELS))})")
        if self.stop_at_early_bird and not self.early_bird:
            raise ValueError("stop_at_early_bird: needs early_bird (the detector) on")
        if self.lr_schedule == "step" and not self.lr_decay_epochs:
            raise ValueError("lr_decay_epochs: the step schedule needs at least one epoch")
        if any(e < 1 or e > self.epochs for e in self.lr_decay_epochs):
            raise ValueError(f"lr_decay_epochs: {list(self.lr_decay_epochs)} must lie in 1..{self.epochs}")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs: {self.warmup_epochs} must be < epochs ({self.epochs})")
        if self.engine != "elephas" and (self.workers != 1 or self.averaging != "epoch"):
            raise ValueError(f"workers/averaging: only the elephas engine takes them "
                             f"(engine is {self.engine!r})")
        return self
