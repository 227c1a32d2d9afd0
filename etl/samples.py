"""Real sample photos and seeded ImageNet-like variants of them, for benchmarks and scale tests.

The photos are the two camera JPEGs scikit-learn ships (no download); variants are seeded crops,
scales and flips re-encoded as JPEG, so the ETL can be measured on realistic image sizes anywhere.
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image


def sample_photos() -> list[bytes]:
    """china.jpg and flower.jpg from scikit-learn: real camera JPEGs, 640x427 each."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-learn is not installed: its sample photos are needed")
    images = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    return [(images / name).read_bytes() for name in ("china.jpg", "flower.jpg")]


def photo_variants(count: int, seed: int = 0, size: tuple[int, int] = (500, 375),
                   quality: int = 90) -> Iterator[bytes]:
    """`count` ImageNet-like JPEGs of `size`: seeded random crops, scales and flips of the photos."""
    rng = np.random.default_rng(seed)
    photos = []
    for data in sample_photos():
        with Image.open(io.BytesIO(data)) as image:
            photos.append(image.convert("RGB"))
    out_w, out_h = size
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        # A crop of 60-100% of the photo with the output's aspect ratio, scaled to `size`.
        frac = rng.uniform(0.6, 1.0)
        crop_h = min(photo.height, int(photo.width * out_h / out_w)) * frac
        crop_w = crop_h * out_w / out_h
        left = rng.uniform(0, photo.width - crop_w)
        top = rng.uniform(0, photo.height - crop_h)
        image = photo.resize(size, Image.Resampling.BICUBIC,
                             box=(left, top, left + crop_w, top + crop_h))
        if rng.integers(2):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        yield out.getvalue()
