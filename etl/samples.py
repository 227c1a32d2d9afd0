"""Real sample photos and seeded ImageNet-like variants of them, for benchmarks and scale tests.

The photos are the two camera JPEGs scikit-learn ships (no download); variants are seeded crops,
scales and flips re-encoded as JPEG, so the ETL can be measured on realistic image sizes anywhere.
Also: a zone plate (the aliasing test pattern) and ImageNet-sized folder trees of hard links.
"""
from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm


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


def zone_plate(size: int) -> np.ndarray:
    """A size x size grey zone plate (as RGB uint8): concentric rings whose frequency rises
    linearly from 0 at the centre to the Nyquist limit (0.5 cycles per pixel) at the edge's
    midpoints. Resizing it shows aliasing as rings that should not be there."""
    return np.repeat(zone_plate_values(size, size, 0.5 / (size / 2))[..., None], 3, axis=2) \
        .round().astype(np.uint8)


def zone_plate_values(size: int, samples: int, rate: float) -> np.ndarray:
    """The zone plate of `zone_plate(size)` sampled at the centres of a samples x samples grid
    over the same square, as float levels: local frequency `rate` * radius cycles per pixel of
    the original size, phase pi * rate * radius^2."""
    step = size / samples
    coords = (np.arange(samples) + 0.5) * step - size / 2
    radius2 = coords[None, :] ** 2 + coords[:, None] ** 2
    return 127.5 + 127.5 * np.cos(np.pi * rate * radius2)


# ImageNet-1k's listing: 1,281,167 training images in 1000 synset folders, 50,000 validation.
IMAGENET_TRAIN = 1_281_167
IMAGENET_VALIDATION = 50_000
IMAGENET_CLASSES = 1000
# ext4 allows 65,000 links to one inode: spread the names over enough real files.
_LINKS_PER_FILE = 50_000


def imagenet_tree_counts(fraction: float, classes: int = IMAGENET_CLASSES) -> tuple[list[int], int]:
    """(train images per class, validation images) of `fraction` of ImageNet's listing, the
    training images spread as evenly as the total allows."""
    train = max(classes, round(IMAGENET_TRAIN * fraction))
    validation = max(1, round(IMAGENET_VALIDATION * fraction))
    return [train // classes + (1 if c < train % classes else 0) for c in range(classes)], validation


def build_imagenet_tree(root: Path, per_class: list[int], validation: int,
                        image_size: tuple[int, int] = (80, 60), seed: int = 0) -> dict:
    """An `imagenet-folder` input of hard links to a few real photos: ROOT/train/<synset>/
    <synset>_<i>.JPEG, a flat ROOT/val/ILSVRC2012_val_<8 digits>.JPEG and beside ROOT the
    ground-truth file (line i: synset of validation image i). Millions of names cost one
    directory entry each, not one image each. Returns what was built; `root` must not exist.
    """
    root = Path(root)
    pool_dir = root.parent / f"{root.name}.pool"
    total = sum(per_class) + validation
    n_files = max(8, -(-total // _LINKS_PER_FILE))
    pool_dir.mkdir(parents=True, exist_ok=True)
    pool = []
    for i, data in enumerate(photo_variants(n_files, seed=seed, size=image_size)):
        path = pool_dir / f"photo_{i:04d}.JPEG"
        path.write_bytes(data)
        pool.append(path)
    synsets = [f"n{c:08d}" for c in range(len(per_class))]
    made = 0
    with tqdm(total=total, desc=f"linking {root.name}", unit="name", mininterval=2.0) as bar:
        for synset, count in zip(synsets, per_class):
            folder = root / "train" / synset
            folder.mkdir(parents=True)
            for i in range(count):
                os.link(pool[made % n_files], folder / f"{synset}_{i}.JPEG")
                made += 1
            bar.update(count)
        (root / "val").mkdir(parents=True)
        truth = []
        for i in range(1, validation + 1):
            os.link(pool[made % n_files], root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
            truth.append(synsets[(i * 7) % len(synsets)])
            made += 1
        bar.update(validation)
    ground_truth = root.parent / f"{root.name}.val_ground_truth.txt"
    ground_truth.write_text("".join(s + "\n" for s in truth))
    return {"root": str(root), "ground_truth": str(ground_truth), "train": sum(per_class),
            "validation": validation, "classes": len(per_class), "files": n_files,
            "image_size": list(image_size)}
