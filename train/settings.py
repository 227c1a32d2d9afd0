"""Settings of a dense training run (`bigticket train dense`).

Validation here is what can be checked without reading the dataset (names, ranges, rewind
syntax); `train.run.resolve_settings` adds the checks that need the dataset (rewind points past
the end of training, classes vs model, input size) before any training starts.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import pydantic

from common.settings import CONFIG_ONLY, Flag, settings_dataclass
from train.adversarial import ADV_DEFAULTS, ADVERSARIAL_MODES
from train.adversarial import check_settings as check_adversarial
from train.checkpoints import RewindPoint
from train.gmp_schedule import GMP_DEFAULTS
from train.gmp_schedule import check_settings as check_gmp
from train.models import BATCHNORM_MODELS, MODELS, check_model_name, check_model_options, has_batchnorm

ENGINES = ("elephas", "local", "multiworker")
# Fields added after the first runs, with the defaults that left them out of the identity hash.
LATER_FIELD_DEFAULTS = {"bn_l1": 0.0, "early_bird": False, "early_bird_ratio": 0.5,
                        "early_bird_window": 5, "early_bird_threshold": 0.1,
                        "stop_at_early_bird": False}
LATER_FIELD_DEFAULTS.update(ADV_DEFAULTS)  # adversarial training (train.adversarial)
# BatchNorm recalibration before evaluations (train.bn_recalibration): not what is trained.
LATER_FIELD_DEFAULTS.update({"bn_recalibration": "auto", "bn_recalibration_batches": 20})
LATER_FIELD_DEFAULTS.update(GMP_DEFAULTS)  # gradual magnitude pruning (train.gmp_schedule)
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
    # Adversarial training (train.adversarial; at their defaults out of the identity).
    adversarial: Literal[ADVERSARIAL_MODES] = pydantic.Field(
        default="none", description="train on PGD (Madry et al.) or FGSM examples of each batch")
    adv_epsilon: Annotated[float, Flag(metavar="EPS")] = pydantic.Field(
        default=0.0, ge=0, le=1, description="adversarial training: L-inf radius on the [0, 1] "
                                             "image scale (0.1 digits, 8/255 CIFAR)")
    adv_steps: Annotated[int, Flag(metavar="N")] = pydantic.Field(
        default=7, ge=1, le=1000, description="adversarial training: PGD steps per batch")
    adv_step_size: Annotated[Optional[float], Flag(metavar="ALPHA")] = pydantic.Field(
        default=None, gt=0, le=1, description="adversarial training: PGD step on the [0, 1] "
                                              "scale (default 2.5 * eps / steps)")
    adv_random_start: bool = pydantic.Field(
        default=True, description="adversarial training: PGD starts at a uniform random point "
                                  "of the eps-ball")

    # Gradual magnitude pruning (train.gmp; at their defaults out of the identity).
    gmp_schedule: Literal["none", "constant", "polynomial"] = pydantic.Field(
        default="none", description="gradual magnitude pruning during training: polynomial "
                                    "(Zhu & Gupta) or constant sparsity")
    gmp_initial_sparsity: Annotated[float, Flag(metavar="S")] = pydantic.Field(
        default=0.0, ge=0, lt=1, description="GMP: sparsity at gmp_begin_step (polynomial)")
    gmp_final_sparsity: Annotated[Optional[float], Flag(metavar="S")] = pydantic.Field(
        default=None, ge=0, lt=1, description="GMP: sparsity reached at gmp_end_step (required "
                                              "with a schedule)")
    gmp_begin_step: Annotated[int, Flag(metavar="STEP")] = pydantic.Field(
        default=0, ge=0, description="GMP: global step of the first mask update")
    gmp_end_step: Annotated[Optional[int], Flag(metavar="STEP")] = pydantic.Field(
        default=None, ge=1, description="GMP: step of the last update (default: the last step "
                                        "of training); masks are frozen after it")
    gmp_power: Annotated[float, Flag(metavar="P")] = pydantic.Field(
        default=3.0, gt=0, le=100, description="GMP: exponent of the polynomial schedule")
    gmp_frequency: Annotated[int, Flag(metavar="STEPS")] = pydantic.Field(
        default=100, ge=1, description="GMP: steps between mask updates (a last one is forced "
                                       "at gmp_end_step)")
    gmp_scope: Literal["global", "layer"] = pydantic.Field(
        default="global", description="GMP: one magnitude threshold over all pruned kernels, "
                                      "or the same sparsity in each")
    gmp_exclude: Annotated[tuple[str, ...], Flag(metavar="PATTERN")] = pydantic.Field(
        default=(), description="GMP: weights never pruned (fnmatch on the variable path or the "
                                "layer name), e.g. fc3")
    gmp_prune_depthwise: bool = pydantic.Field(
        default=False, description="GMP: prune depthwise kernels too (BatchNorm and biases never)")

    # BatchNorm recalibration (train.bn_recalibration; at their defaults out of the identity).
    bn_recalibration: Literal["auto", "on", "off"] = pydantic.Field(
        default="auto", description="recompute BatchNorm moving statistics from training batches "
                                    "before each evaluation; auto: where they are stale (elephas "
                                    "with >1 worker, epochs shorter than the momentum's window)")
    bn_recalibration_batches: Annotated[int, Flag(metavar="N")] = pydantic.Field(
        default=20, ge=1, le=100_000, description="training batches per recalibration")

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
        check_gmp(self)  # schedule fields (train.gmp_schedule)
        check_adversarial(self)  # adv_epsilon > 0 when adversarial
        if (self.early_bird or self.bn_l1 > 0) and not has_batchnorm(self.model):
            field = "early_bird" if self.early_bird else "bn_l1"
            raise ValueError(f"{field}: model {self.model!r} has no BatchNorm layers (models with "
                             f"BatchNorm: {', '.join(sorted(BATCHNORM_MODELS))})")
        if self.bn_recalibration == "on" and not has_batchnorm(self.model):
            raise ValueError(f"bn_recalibration: model {self.model!r} has no BatchNorm layers")
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
