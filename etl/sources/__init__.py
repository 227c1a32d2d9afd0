"""Image sources, one module per kind. Each exposes a `Source` (see `etl.sources.base`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from etl.sources.base import Source

if TYPE_CHECKING:  # the settings module is only needed for the annotation
    from etl.settings import EtlSettings


def make_source(settings: "EtlSettings") -> Source:
    """The source named by `settings.source`, built on the driver (it validates the input)."""
    s = settings
    kind = s.source
    if kind == "imagenet-folder":
        from etl.sources.folder import FolderSource

        return FolderSource(s.input, s.synsets_file, s.synset_words_file,
                            s.val_ground_truth_file, s.max_image_bytes)
    if kind == "imagenet-tar":
        from etl.sources.imagenet_tar import TarSource

        return TarSource(s.input, s.synsets_file, s.synset_words_file, s.val_ground_truth_file,
                         s.max_image_bytes)
    if kind in ("cifar10", "cifar100"):
        from etl.sources.cifar import CifarSource

        return CifarSource(kind, s.input)
    if kind == "urls":
        from etl.sources.download import Downloader
        from etl.sources.urls import UrlSource

        downloader = Downloader(timeout=s.download_timeout, retries=s.download_retries,
                                max_redirects=s.max_redirects, max_bytes=s.max_image_bytes,
                                allow_private=s.allow_private_addresses)
        return UrlSource(s.input, downloader, s.seed, s.validation_fraction, s.synsets_file,
                         s.synset_words_file)
    if kind == "digits":
        from etl.sources.digits import DigitsSource

        return DigitsSource(s.out, s.seed, s.validation_fraction, s.max_image_bytes)
    raise ValueError(f"source: unknown source {kind!r}")
