"""Settings of the ETL job (`bigticket etl prepare`)."""
from __future__ import annotations

from typing import Literal, Optional

import pydantic

from common.settings import settings_dataclass

SOURCES = ("imagenet-folder", "imagenet-tar", "cifar10", "cifar100", "urls", "digits")
FORMATS = {"tfrecord": ("tfrecord",), "parquet": ("parquet",), "both": ("tfrecord", "parquet")}


@settings_dataclass
class EtlSettings:
    source: Literal["imagenet-folder", "imagenet-tar", "cifar10", "cifar100", "urls", "digits"]
    out: str
    input: Optional[str] = None
    resize: str = "fixed:64"            # fixed:N | center:N | shorter:N (etl.images.ResizePolicy)
    format: Literal["tfrecord", "parquet", "both"] = "both"
    train_shards: int = pydantic.Field(default=8, ge=1, le=100_000)
    validation_shards: int = pydantic.Field(default=2, ge=1, le=100_000)
    quality: int = pydantic.Field(default=90, ge=1, le=100)
    seed: int = 0
    max_image_bytes: int = pydantic.Field(default=32 * 1024 * 1024, ge=1)
    max_image_pixels: int = pydantic.Field(default=178_956_970, ge=1)  # Pillow's own bomb limit
    # Source options (ignored by sources that do not use them).
    synsets_file: Optional[str] = None          # one synset per line: class order
    synset_words_file: Optional[str] = None     # "<synset>\t<words>": image/class/text
    val_ground_truth_file: Optional[str] = None # line i = synset (or 1-based index) of val image i
    validation_fraction: float = pydantic.Field(default=0.2, gt=0, lt=1)  # digits / urls split
    allow_private_addresses: bool = False       # urls: permit loopback/private/link-local hosts
    download_timeout: float = pydantic.Field(default=20.0, gt=0)
    download_retries: int = pydantic.Field(default=3, ge=0, le=20)
    max_redirects: int = pydantic.Field(default=5, ge=0, le=50)

    @pydantic.model_validator(mode="after")
    def _check(self):
        from etl.images import ResizePolicy

        ResizePolicy.parse(self.resize)  # raises ValueError naming --resize
        if self.source != "digits" and not self.input:
            raise ValueError(f"input: --input is required for source {self.source!r}")
        return self

    @property
    def formats(self) -> tuple[str, ...]:
        return FORMATS[self.format]

    def shards_for(self, split: str) -> int:
        return self.train_shards if split == "train" else self.validation_shards
