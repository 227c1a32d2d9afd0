"""The registry of image sources: the one `settings.source` names, built on the driver."""
from __future__ import annotations

from typing import TYPE_CHECKING

from etl.sources.base import Source
from etl.sources.cifar import CifarSource
from etl.sources.digits import DigitsSource
from etl.sources.download import Downloader
from etl.sources.folder import FolderSource
from etl.sources.imagenet_tar import TarSource
from etl.sources.urls import UrlSource

if TYPE_CHECKING:  # the settings module is only needed for the annotation
    from etl.settings import EtlSettings


def _folder(s: "EtlSettings") -> Source:
    return FolderSource(s.input, s.synsets_file, s.synset_words_file, s.val_ground_truth_file,
                        s.max_image_bytes)


def _tar(s: "EtlSettings") -> Source:
    return TarSource(s.input, s.synsets_file, s.synset_words_file, s.val_ground_truth_file,
                     s.max_image_bytes)


def _urls(s: "EtlSettings") -> Source:
    downloader = Downloader(timeout=s.download_timeout, retries=s.download_retries,
                            max_redirects=s.max_redirects, max_bytes=s.max_image_bytes,
                            allow_private=s.allow_private_addresses)
    return UrlSource(s.input, downloader, s.seed, s.validation_fraction, s.synsets_file,
                     s.synset_words_file)


SOURCES = {
    "imagenet-folder": _folder,
    "imagenet-tar": _tar,
    "cifar10": lambda s: CifarSource("cifar10", s.input),
    "cifar100": lambda s: CifarSource("cifar100", s.input),
    "urls": _urls,
    "digits": lambda s: DigitsSource(s.out, s.seed, s.validation_fraction, s.max_image_bytes),
}


def make_source(settings: "EtlSettings") -> Source:
    """The source named by `settings.source`, built on the driver (it validates the input)."""
    build = SOURCES.get(settings.source)
    if build is None:
        raise ValueError(f"source: unknown source {settings.source!r}")
    return build(settings)
