"""cifar10 / cifar100 over tiny files in the real byte layouts and pickle structures."""
from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

import tests.etl.test_sources_folder as folder_tests
from etl.sources.cifar import CifarSource
from etl.sources.safe_pickle import RefusedPickle, safe_loads

NAMES = {"cifar10": [f"class{i}" for i in range(10)],
         "cifar100": [f"fine{i:02d}" for i in range(100)]}
FOLDERS = {("cifar10", "bin"): "cifar-10-batches-bin", ("cifar10", "py"): "cifar-10-batches-py",
           ("cifar100", "bin"): "cifar-100-binary", ("cifar100", "py"): "cifar-100-python"}


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` (BINSTRING), as the cPickle that made CIFAR's
    python batches did; NumPy arrays then reduce exactly as in the distributed files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_str8(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        n = len(data)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256
                    else pickle.BINSTRING + struct.pack("<i", n)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_str8
    dispatch[str] = save_str8


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), \
        rng.integers(0, 10, n).tolist()


def rows(imgs: np.ndarray) -> np.ndarray:
    """CIFAR rows: the 1024 red, 1024 green, then 1024 blue values of each image."""
    return imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)


def write_dataset(folder: Path, variant: str, fmt: str, batches: dict) -> None:
    """batches: file stem -> (images, labels). Written as the distribution lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    names = NAMES[variant]
    for stem, (imgs, labels) in batches.items():
        if fmt == "bin":
            lead = [[lab // 5, lab] if variant == "cifar100" else [lab] for lab in labels]
            data = np.concatenate([np.array(lead, dtype=np.uint8), rows(imgs)], axis=1)
            (folder / f"{stem}.bin").write_bytes(data.tobytes())
        else:
            key = b"fine_labels" if variant == "cifar100" else b"labels"
            batch = {b"batch_label": stem.encode(), key: list(labels), b"data": rows(imgs),
                     b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
            if variant == "cifar100":
                batch[b"coarse_labels"] = [lab // 5 for lab in labels]
            (folder / stem).write_bytes(py2_pickle(batch))
    if fmt == "bin":
        meta = "batches.meta.txt" if variant == "cifar10" else "fine_label_names.txt"
        (folder / meta).write_text("\n".join(names) + "\n\n")
    elif variant == "cifar10":
        (folder / "batches.meta").write_bytes(py2_pickle(
            {b"label_names": [n.encode() for n in names], b"num_vis": 3072}))
    else:
        (folder / "meta").write_bytes(py2_pickle(
            {b"fine_label_names": [n.encode() for n in names],
             b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}))


def standard_batches(variant: str) -> dict:
    if variant == "cifar10":
        return {"data_batch_1": images(3, 1), "data_batch_2": images(2, 2),
                "data_batch_10": images(1, 3), "test_batch": images(2, 4)}
    return {"train": images(4, 5), "test": images(2, 6)}


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("fmt", ["bin", "py"])
@pytest.mark.parametrize("packed", ["folder", "parent", "archive"])
def test_records_labels_and_pixels(tmp_path, variant, fmt, packed):
    batches = standard_batches(variant)
    folder = tmp_path / FOLDERS[(variant, fmt)]
    write_dataset(folder, variant, fmt, batches)
    target = {"folder": folder, "parent": tmp_path}.get(packed)
    if packed == "archive":
        target = tmp_path / "dist.tar.gz"
        with tarfile.open(target, "w:gz") as tf:
            tf.add(folder, arcname=folder.name)
    source = CifarSource(variant, str(target))
    assert [c.name for c in source.classes()] == NAMES[variant]
    got = folder_tests.drain(source)
    expected = {}
    for stem, (imgs, labels) in batches.items():
        split = "validation" if stem.startswith("test") else "train"
        name = f"{stem}.bin" if fmt == "bin" else stem
        for i, (img, lab) in enumerate(zip(imgs, labels)):
            expected[f"{split}/{name}/{i:05d}"] = (split, lab, img)
    assert set(got) == set(expected)
    for key, (record, payload) in got.items():
        split, lab, img = expected[key]
        assert (record.split, record.label) == (split, lab)
        assert payload.dtype == np.uint8 and payload.shape == (32, 32, 3)
        np.testing.assert_array_equal(payload, img)
    if variant == "cifar10":  # batches in numeric order: 1, 2, 10
        assert [u.name for u in source.units()][:3] == [
            f"data_batch_{i}{'.bin' if fmt == 'bin' else ''}" for i in (1, 2, 10)]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_names_os_system_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    write_dataset(folder, "cifar10", "py", standard_batches("cifar10"))
    evil = {b"labels": [1], b"data": _Evil(marker)}
    (folder / "data_batch_2").write_bytes(pickle.dumps(evil, protocol=2))
    source = CifarSource("cifar10", str(folder))  # only the meta file is read here
    unit = next(u for u in source.units() if u.name == "data_batch_2")
    with pytest.raises(RefusedPickle, match=r"data_batch_2: refused pickle global posix\.system"):
        list(source.records(unit))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": _Evil(marker)}))
    with pytest.raises(RefusedPickle, match=r"batches\.meta: refused pickle global"):
        CifarSource("cifar10", str(folder))
    assert not marker.exists()


def test_safe_loads_admits_arrays_and_containers_only(tmp_path):
    value = {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [1, 2.5, "x", None],
             "c": {3, 4}, "d": np.float32(1.5)}
    for protocol in (2, 4, 5):
        back = safe_loads(pickle.dumps(value, protocol=protocol), "v.pkl")
        np.testing.assert_array_equal(back["a"], value["a"])
        assert back["b"] == value["b"] and back["c"] == {3, 4} and back["d"] == 1.5
    import collections
    with pytest.raises(RefusedPickle, match="v.pkl: refused pickle global collections.OrderedDict"):
        safe_loads(pickle.dumps(collections.OrderedDict(a=1)), "v.pkl")
    with pytest.raises(ValueError, match="v.pkl: not a readable pickle"):
        safe_loads(b"\x80\x02garbage", "v.pkl")


def test_bad_labels_and_truncated_tail_are_records(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_dataset(folder, "cifar10", "bin", {"data_batch_1": images(3, 1),
                                             "test_batch": images(1, 2)})
    data = bytearray((folder / "data_batch_1.bin").read_bytes())
    data[3073] = 12  # second record's label is outside 0..9
    (folder / "data_batch_1.bin").write_bytes(bytes(data) + b"\x01" * 100)
    got = folder_tests.drain(CifarSource("cifar10", str(folder)))
    rejects = {k: r.reject[0] for k, (r, _) in got.items() if r.reject}
    assert rejects == {"train/data_batch_1.bin/00001": "no_label",
                       "train/data_batch_1.bin/00003": "truncated"}
    assert len(got) == 3 + 1 + 1


def test_structural_errors(tmp_path):
    with pytest.raises(ValueError, match="no CIFAR batches"):
        CifarSource("cifar10", str(tmp_path))
    folder = tmp_path / "cifar-10-batches-bin"
    write_dataset(folder, "cifar10", "bin", {"data_batch_1": images(1, 1)})
    with pytest.raises(ValueError, match="test_batch.bin is missing"):
        CifarSource("cifar10", str(folder))
    write_dataset(folder, "cifar10", "bin", {"test_batch": images(1, 1)})
    (folder / "batches.meta.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"batches.meta.txt: expected 10 distinct class names"):
        CifarSource("cifar10", str(folder))
    write_dataset(folder, "cifar10", "py", {"data_batch_1": images(1, 1)})
    with pytest.raises(ValueError, match="both binary and python"):
        CifarSource("cifar10", str(folder))
