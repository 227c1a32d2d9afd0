"""digits: scikit-learn's real handwritten digits written as a folder tree, and make_source."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import tests.etl.test_sources_folder as folder_tests
from common.settings import make_settings
from etl.settings import EtlSettings
from etl.sources.cifar import CifarSource
from etl.sources.digits import MARKER, DigitsSource, cache_dir
from etl.sources.folder import FolderSource
from etl.sources.imagenet_tar import TarSource
from etl.sources.registry import make_source
from etl.sources.urls import UrlSource


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory):
    """One written tree shared by the tests below (writing it is the slow part)."""
    out = tmp_path_factory.mktemp("digits")
    DigitsSource(str(out), seed=7, validation_fraction=0.25)
    return out


def test_tree_labels_pixels_and_stratified_split(digits_out):
    source = DigitsSource(str(digits_out), seed=7, validation_fraction=0.25)
    assert [(c.synset, c.name) for c in source.classes()] == \
        [(f"digit_{d}", f"digit {d}") for d in range(10)]
    got = folder_tests.drain(source)
    digits = load_digits()
    assert len(got) == len(digits.target) == 1797
    assert not any(r.reject for r, _ in got.values())
    expected_val = sum(round((digits.target == d).sum() * 0.25) for d in range(10))
    assert sum(r.split == "validation" for r, _ in got.values()) == expected_val
    for key, (record, payload) in got.items():
        index = int(key.rsplit("_", 1)[-1].split(".")[0])
        assert record.label == digits.target[index]
        assert key == f"{record.split}/digit_{record.label}/digits_{index:04d}.png"
        pixels = np.asarray(Image.open(io.BytesIO(payload)))
        assert pixels.shape == (8, 8)
        np.testing.assert_array_equal(pixels, np.rint(digits.images[index] * 255 / 16))


def _val_keys(source) -> set:
    return {r.key for unit in source.units() for r in source.records(unit)
            if r.split == "validation"}


def test_tree_is_reused_and_rebuilt_when_settings_change(tmp_path, digits_out):
    root = cache_dir(digits_out)
    marker_mtime = (root / MARKER).stat().st_mtime_ns
    first = _val_keys(DigitsSource(str(digits_out), seed=7, validation_fraction=0.25))
    assert (root / MARKER).stat().st_mtime_ns == marker_mtime  # reused, not rewritten

    # Another seed in another output: a different split of the same images. A half-written tree
    # left there (no marker) is replaced, junk and all.
    other = cache_dir(tmp_path)
    (other / "train" / "digit_0").mkdir(parents=True)
    (other / "train" / "digit_0" / "junk.png").write_bytes(b"partial")
    second = _val_keys(DigitsSource(str(tmp_path), seed=8, validation_fraction=0.25))
    assert first != second and len(first) == len(second)
    assert not (other / "train" / "digit_0" / "junk.png").exists()
    assert sum(1 for _ in other.rglob("*.png")) == 1797
    assert [p.name for p in other.parent.iterdir()] == ["digits"]  # no temp dirs left


def _settings(tmp_path, **kw):
    return make_settings(EtlSettings, {"out": str(tmp_path / "out"), **kw})


def test_make_source_builds_every_kind(tmp_path, digits_out):
    folder_tests.build_imagenet_tree(tmp_path / "tree")
    gt = str(tmp_path / "tree" / "gt.txt")
    source = make_source(_settings(tmp_path, source="imagenet-folder", input=str(tmp_path / "tree"),
                                   val_ground_truth_file=gt, max_image_bytes=1234))
    assert isinstance(source, FolderSource) and source.max_image_bytes == 1234

    outer = tmp_path / "train.tar"
    with tarfile.open(outer, "w") as tf:
        tf.add(tmp_path / "tree" / "train" / "n01" / "n01_1.JPEG", arcname="n01.tar")
    assert isinstance(make_source(_settings(tmp_path, source="imagenet-tar", input=str(outer))),
                      TarSource)

    (tmp_path / "u.tsv").write_text("a\thttp://example.org/x.jpg\n")
    urls = make_source(_settings(tmp_path, source="urls", input=str(tmp_path / "u.tsv"),
                                 download_timeout=3.5, download_retries=1, max_redirects=2,
                                 allow_private_addresses=True))
    assert isinstance(urls, UrlSource)
    d = urls.downloader
    assert (d.timeout, d.retries, d.max_redirects, d.allow_private) == (3.5, 1, 2, True)

    import tests.etl.test_sources_cifar as cifar_tests
    cifar_dir = tmp_path / "cifar-100-binary"
    cifar_tests.write_dataset(cifar_dir, "cifar100", "bin",
                              cifar_tests.standard_batches("cifar100"))
    cifar = make_source(_settings(tmp_path, source="cifar100", input=str(cifar_dir)))
    assert isinstance(cifar, CifarSource) and len(cifar.classes()) == 100

    digits = make_source(make_settings(EtlSettings, {
        "out": str(digits_out), "source": "digits", "seed": 7, "validation_fraction": 0.25}))
    assert isinstance(digits, DigitsSource)
    assert digits.root == cache_dir(digits_out).resolve()


def test_make_source_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--input: .*nowhere"):
        make_source(_settings(tmp_path, source="imagenet-folder", input=str(tmp_path / "nowhere")))
