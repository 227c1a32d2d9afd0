"""Settings of a dense training run (`bigticket train dense`).

Validation here is what can be checked without reading the dataset (names, ranges, rewind
syntax); `train.run.resolve_settings` adds the checks that need the dataset (rewind points past
the end of training, classes vs model, input size) before any training starts.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import pydantic

from common.settings import CONFIG_ONLY, Flag, settings_dataclass
from train.checkpoints import RewindPoint
from train.models import BATCHNORM_MODELS, MODELS, check_model_name, check_model_options, has_batchnorm

ENGINES = ("elephas", "local", "multiworker")
# Fields added after the first runs, with the defaults that left them out of the identity hash.
LATER_FIELD_DEFAULTS = {"bn_l1": 0.0, "early_bird": False, "early_bird_ratio": 0.5,
                        "early_bird_window": 5, "early_bird_threshold": 0.1,
                        "stop_at_early_bird": False}
# Fields that say where things are or how they are launched, not what is computed: the run's
# identity hashes these values in their place (the dataset is identified by its manifest's sha256).
NON_IDENTITY_FIELDS = {"data": "", "out": "", "master": None}


@settings_dataclass
class DenseSettings:
    data: Annotated[str, Flag(metavar="DIR")] = pydantic.Field(
        description="dataset directory written by `bigticket etl prepare`")
    model: str = pydantic.Field(description=f"one of {', '.join(MODELS)}")
    out: Annotated[str, Flag(metavar="RUNS_ROOT")] = pydantic.Field(
        default="runs", description="runs root; the run is RUNS_ROOT/dense-<hash>")
    model_options: Annotated[dict[str, Any], Flag("--model-option")] = pydantic.Field(
        default_factory=dict,
        description="model option, repeatable (e.g. alpha=0.35 for mobilenet_v2)")
    engine: Literal[ENGINES] = pydantic.Field(default="local", description="training engine")
    epochs: int = pydantic.Field(default=10, ge=1, le=100_000, description="training epochs")
    rewind: tuple[str, ...] = pydantic.Field(
        default=(), description="late-reset checkpoints, e.g. 0ep,1ep,2ep,500it")
    batch_size: int = pydantic.Field(default=64, ge=1, le=1_000_000,
                                     description="per worker / replica group")
    lr: float = pydantic.Field(default=0.05, gt=0, le=100, description="base learning rate")
    lr_schedule: Literal["constant", "cosine", "step"] = pydantic.Field(
        default="cosine", description="learning-rate schedule after the warm-up")
    warmup_epochs: float = pydantic.Field(default=0.0, ge=0,
                                          description="linear warm-up from 0, in epochs")
    lr_decay_epochs: tuple[int, ...] = pydantic.Field(
        default=(), description="step schedule: epochs at which the rate is multiplied by "
                                "lr_decay_factor, e.g. 80,120")
    lr_decay_factor: float = pydantic.Field(default=0.1, gt=0, le=1,
                                            description="step schedule: factor per decay")
    optimizer: Literal["sgd", "adam"] = pydantic.Field(default="sgd", description="optimizer")
    momentum: float = pydantic.Field(default=0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = pydantic.Field(default=0.0, ge=0,
                                         description="decoupled weight decay (Keras optimizer)")
    seed: int = pydantic.Field(default=0, description="seed of initialisation and shuffling")
    workers: int = pydantic.Field(default=1, ge=1, le=100_000,
                                  description="elephas: Spark tasks per round")
    averaging: Union[Literal["epoch"], pydantic.PositiveInt] = pydantic.Field(
        default="epoch", description="elephas: 'epoch' or a number of steps K between averages")
    early_stopping_patience: int = pydantic.Field(
        default=0, ge=0, description="epochs without improvement before stopping; 0: off")
    early_stopping_metric: Literal["val_loss", "val_accuracy"] = pydantic.Field(
        default="val_loss", description="metric early stopping watches")
    mixed_precision: bool = pydantic.Field(
        default=False, description="mixed precision: float16 compute on GPUs, bfloat16 on CPUs")
    deterministic: bool = pydantic.Field(
        default=True, description="TensorFlow op determinism: a resumed run equals an "
                                  "uninterrupted one")
    input_size: Optional[int] = pydantic.Field(
        default=None, ge=1, le=4096, description="side of the model's input (default: the "
                                                 "dataset's image size)")
    format: Optional[Literal["tfrecord", "parquet"]] = pydantic.Field(
        default=None, description="shard format to read (default: tfrecord if present)")
    augment: Literal["none", "crop", "crop_flip"] = pydantic.Field(
        default="crop_flip", description="training augmentation")
    num_classes: Annotated[Optional[int], CONFIG_ONLY] = pydantic.Field(
        default=None, ge=2, description="None: the dataset's; else it must match the dataset")
    cache: bool = pydantic.Field(default=True,
                                 description="cache encoded shards in memory across epochs")
    shuffle_buffer: int = pydantic.Field(default=10_000, ge=1,
                                         description="records in the shuffle buffer")
    master: Optional[str] = pydantic.Field(
        default=None, description="Spark master for --engine elephas (default: spark-submit's, "
                                  "or local[*])")
    # Network slimming and Early-Bird tickets. Added after the first runs: at their defaults they
    # are left out of the run's identity (LATER_FIELD_DEFAULTS), so older runs keep their names.
    bn_l1: Annotated[float, Flag(metavar="LAMBDA")] = pydantic.Field(
        default=0.0, ge=0, le=1, description="L1 penalty on every BatchNorm scale (network "
                                             "slimming), e.g. 1e-4")
    early_bird: bool = pydantic.Field(
        default=False, description="after each epoch, draw the BN channel mask and detect the "
                                   "Early-Bird ticket (writes early_bird.json, "
                                   "early_bird_masks.npz, checkpoint early_bird)")
    early_bird_ratio: Annotated[float, Flag(metavar="R")] = pydantic.Field(
        default=0.5, gt=0, lt=1, description="fraction of channels the mask prunes")
    early_bird_window: Annotated[int, Flag(metavar="N")] = pydantic.Field(
        default=5, ge=2, le=10_000, description="consecutive masks compared")
    early_bird_threshold: Annotated[float, Flag(metavar="D")] = pydantic.Field(
        default=0.1, gt=0, le=1, description="drawn when their max Hamming distance is under D")
    stop_at_early_bird: bool = pydantic.Field(
        default=False, description="end dense training once the ticket is drawn (the run still "
                                   "completes)")

    @pydantic.field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        check_model_name(value)
        return value

    @pydantic.field_validator("rewind", mode="before")
    @classmethod
    def _split_rewind(cls, value):
        if isinstance(value, str):  # "0ep,3ep,500it" from a config file
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @pydantic.field_validator("rewind")
    @classmethod
    def _check_rewind(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        points = [RewindPoint.parse(v) for v in value]  # ValueError names the bad point
        labels = [p.label for p in points]
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate rewind points in {list(value)}")
        return tuple(labels)

    @pydantic.model_validator(mode="after")
    def _check(self):
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
