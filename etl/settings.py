"""Settings of the ETL job (`bigticket etl prepare`); each field's description is its flag's help."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

import pydantic

from common.settings import Flag, settings_dataclass
from etl.images import ResizePolicy

SOURCES = ("imagenet-folder", "imagenet-tar", "cifar10", "cifar100", "urls", "digits")
FORMATS = {"tfrecord": ("tfrecord",), "parquet": ("parquet",), "both": ("tfrecord", "parquet")}
# Fields that only judge the job's result: left out of the dataset's identity (etl.job.dataset_hash),
# so changing them keeps the directory's dataset and lets a failed job be accepted on a re-run.
CHECK_ONLY_FIELDS = ("max_quarantined_fraction",)


@settings_dataclass
class EtlSettings:
    source: Literal[SOURCES] = pydantic.Field(description="kind of image source")
    out: str = pydantic.Field(description="the dataset directory to write")
    input: Optional[str] = pydantic.Field(
        default=None, description="the source's path (not needed for digits)")
    resize: str = pydantic.Field(
        default="fixed:64", description="fixed:N (squash), center:N (shorter side, centre crop) "
                                        "or shorter:N (keep aspect)")
    format: Literal[tuple(FORMATS)] = pydantic.Field(
        default="both", description="shard formats written; both = TFRecord and Parquet: about twice the disk of one")
    train_shards: Annotated[int, Flag("--shards")] = pydantic.Field(
        default=8, ge=1, le=100_000, description="train shards")
    validation_shards: int = pydantic.Field(
        default=2, ge=1, le=100_000,
        description="validation shards (default: train shards / 8, at least 1, when the train "
                    "shards are given; else 2)")
    quality: int = pydantic.Field(default=90, ge=1, le=100, description="JPEG quality 1-100")
    seed: int = pydantic.Field(default=0, description="seed of the stable shard shuffling")
    max_image_bytes: int = pydantic.Field(default=32 * 1024 * 1024, ge=1,
                                          description="per-image byte cap")
    max_image_pixels: int = pydantic.Field(  # Pillow's own decompression-bomb limit
        default=178_956_970, ge=1, description="decompression-bomb pixel limit")
    max_quarantined_fraction: float = pydantic.Field(
        default=0.5, ge=0, le=1,
        description="fail the job, publishing nothing, when a split quarantines more than this "
                    "fraction of its inputs (a split with no record always fails)")
    # Source options (ignored by sources that do not use them).
    synsets_file: Optional[str] = pydantic.Field(
        default=None, description="class order: one synset per line")
    synset_words_file: Optional[str] = pydantic.Field(
        default=None, description="'<synset>\\t<words>' lines for image/class/text")
    val_ground_truth_file: Annotated[Optional[str], Flag("--val-ground-truth")] = pydantic.Field(
        default=None, description="flat validation labels: line i = synset (or 1-based class "
                                  "index) of validation image i")
    validation_fraction: float = pydantic.Field(
        default=0.2, gt=0, lt=1, description="digits/urls: held-out fraction")
    allow_private_addresses: bool = pydantic.Field(
        default=False, description="urls: allow loopback/private/link-local hosts")
    download_timeout: float = pydantic.Field(
        default=20.0, gt=0, description="urls: seconds per request")
    download_retries: int = pydantic.Field(
        default=3, ge=0, le=20, description="urls: retries with backoff")
    max_redirects: int = pydantic.Field(default=5, ge=0, le=50, description="urls: redirect limit")

    @pydantic.model_validator(mode="after")
    def _check(self):
        ResizePolicy.parse(self.resize)  # raises ValueError naming --resize
        if self.source != "digits" and not self.input:
            raise ValueError(f"input: --input is required for source {self.source!r}")
        return self

    @property
    def formats(self) -> tuple[str, ...]:
        return FORMATS[self.format]

    def shards_for(self, split: str) -> int:
        return self.train_shards if split == "train" else self.validation_shards
