"""digits: scikit-learn's 1797 real 8x8 handwritten digits as an ImageNet-style folder tree.

The tree (`train|validation/digit_<d>/digits_<i>.png`, values 0..16 scaled to 0..255) is written
once under the output directory, built in a temporary folder and renamed into place, so a killed
run never leaves a half tree that looks complete; a tree whose marker matches the seed and
validation fraction is reused. The split is stratified and seeded. Reading is the folder source's.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.atomic import read_json, write_json
from common.paths import DatasetPaths
from etl.sources.folder import FolderSource

log = logging.getLogger(__name__)

MARKER = "_COMPLETE.json"
TREE_VERSION = 1


def cache_dir(out: str | os.PathLike) -> Path:
    return DatasetPaths(out).source_cache("digits")


def split_indices(labels: np.ndarray, seed: int, validation_fraction: float) -> np.ndarray:
    """Boolean mask of validation images: per class, a seeded fraction of its images."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(len(idx) * validation_fraction))
        val[idx[rng.permutation(len(idx))[:n_val]]] = True
    return val


def write_tree(root: Path, seed: int, validation_fraction: float) -> Path:
    """Write the digits tree at `root` unless a complete one for these settings is there."""
    # scikit-learn takes ~1 s to import; only this source, and only on the driver, needs it.
    from sklearn.datasets import load_digits

    expected = {"version": TREE_VERSION, "seed": seed, "validation_fraction": validation_fraction}
    marker = root / MARKER
    with contextlib.suppress(FileNotFoundError, ValueError):
        if {k: read_json(marker).get(k) for k in expected} == expected:
            log.info("digits: reusing %s", root)
            return root
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    val = split_indices(labels, seed, validation_fraction)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        for i, (image, label) in enumerate(tqdm(zip(images, labels), total=len(labels),
                                                desc="writing digits", unit=" images",
                                                disable=None, leave=False)):
            folder = tmp / ("validation" if val[i] else "train") / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(image, mode="L").save(buf, format="PNG")
            (folder / f"digits_{i:04d}.png").write_bytes(buf.getvalue())
        write_json(tmp / MARKER, {**expected, "images": int(len(labels)),
                                  "validation": int(val.sum())})
        if root.exists():
            shutil.rmtree(root)  # a stale tree (other seed or fraction, or half-deleted)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("digits: wrote %d images (%d validation) to %s", len(labels), int(val.sum()), root)
    return root


class DigitsSource(FolderSource):
    def __init__(self, out: str, seed: int = 0, validation_fraction: float = 0.2,
                 max_image_bytes: int = 32 * 1024 * 1024):
        self.seed, self.validation_fraction = seed, validation_fraction
        root = write_tree(cache_dir(out), seed, validation_fraction)
        super().__init__(str(root), max_image_bytes=max_image_bytes, kind="digits")
        self._classes = [type(c)(c.index, c.synset, c.synset.replace("_", " "))
                         for c in self._classes]

    def describe(self) -> dict[str, Any]:
        return {"kind": "digits", "origin": "sklearn.datasets.load_digits", "input": str(self.root),
                "seed": self.seed, "validation_fraction": self.validation_fraction}
