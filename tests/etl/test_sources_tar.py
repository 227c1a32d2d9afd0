"""imagenet-tar over real tars built with tarfile, including malicious members."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

import tests.etl.test_sources_folder as folder_tests
from etl.records import Rejected
from etl.sources.folder import FolderSource
from etl.sources.imagenet_tar import TRAIN_TAR, VAL_TAR, TarSource, Window


def add_file(tf: tarfile.TarFile, name: str, data: bytes, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data))


def add_special(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tf.addfile(info)


def tar_bytes(members) -> bytes:
    """members: (name, bytes) for regular files, or a callable(tf) for special members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            m(tf) if callable(m) else add_file(tf, *m)
    return buf.getvalue()


def tars_from_tree(root: Path, out: Path, extra_train=(), extra_inner=None, extra_val=()):
    """The official layout built from a folder tree (train/<synset>/*, flat val/*)."""
    extra_inner = extra_inner or {}
    out.mkdir(parents=True, exist_ok=True)
    inner = []
    for synset_dir in sorted((root / "train").iterdir()):
        members = [(p.name, p.read_bytes()) for p in sorted(synset_dir.iterdir())]
        members += extra_inner.get(synset_dir.name, [])
        inner.append((f"{synset_dir.name}.tar", tar_bytes(members)))
    (out / TRAIN_TAR).write_bytes(tar_bytes(inner + list(extra_train)))
    val = [(p.name, p.read_bytes()) for p in sorted((root / "val").iterdir())]
    (out / VAL_TAR).write_bytes(tar_bytes(val + list(extra_val)))
    return out


def listing(path: Path) -> set:
    return {p for p in path.rglob("*")}


def test_same_keys_labels_and_bytes_as_the_folder_source(tmp_path):
    tree = tmp_path / "tree"
    folder_tests.build_imagenet_tree(tree)
    tars = tars_from_tree(tree, tmp_path / "tars")
    gt = str(tree / "gt.txt")
    folder = folder_tests.drain(FolderSource(str(tree), val_ground_truth_file=gt))
    before = listing(tmp_path)
    tar_source = TarSource(str(tars), val_ground_truth_file=gt)
    got = folder_tests.drain(tar_source)
    assert listing(tmp_path) == before  # nothing was extracted or copied
    assert [c.synset for c in tar_source.classes()] == ["n01", "n02", "n03"]
    assert {k: (r.split, r.label) for k, (r, _) in got.items()} == \
        {k: (r.split, r.label) for k, (r, _) in folder.items()}
    assert {k: p for k, (_, p) in got.items()} == {k: p for k, (_, p) in folder.items()}
    assert len(got) == 8


def test_malicious_and_odd_members_become_rejected_records(tmp_path):
    tree = tmp_path / "tree"
    folder_tests.build_imagenet_tree(tree)
    good = folder_tests.image_bytes(30)
    inner_extra = {"n01": [
        lambda tf: add_special(tf, "link.JPEG", tarfile.SYMTYPE, "/etc/passwd"),
        lambda tf: add_special(tf, "hard.JPEG", tarfile.LNKTYPE, "n01_1.JPEG"),
        ("../up.JPEG", good), ("/abs.JPEG", good), ("sub/nested.JPEG", good),
        (".hidden.JPEG", good), ("./dot.JPEG", good), ("big.JPEG", b"\xff" * 5000),
        lambda tf: add_special(tf, "dev.JPEG", tarfile.CHRTYPE),
    ]}
    extra_train = [
        lambda tf: add_special(tf, "n04.tar", tarfile.SYMTYPE, "/etc/shadow"),
        ("../evil.tar", tar_bytes([("x.JPEG", good)])),
        ("/abs.tar", tar_bytes([("x.JPEG", good)])),
        lambda tf: add_special(tf, "n05", tarfile.DIRTYPE),
        lambda tf: add_special(tf, "fifo.tar", tarfile.FIFOTYPE),
        ("readme.txt", b"hello"),
        ("n06.tar", b"this is not a tar archive at all" * 40),
    ]
    extra_val = [lambda tf: add_special(tf, "ILSVRC2012_val_00000002.JPEG.lnk", tarfile.SYMTYPE,
                                        "../../etc/passwd"),
                 ("../ILSVRC2012_val_00000003.JPEG", good)]
    tars = tars_from_tree(tree, tmp_path / "tars", extra_train, inner_extra, extra_val)
    source = TarSource(str(tars), val_ground_truth_file=str(tree / "gt.txt"),
                       max_image_bytes=4000)
    assert [c.synset for c in source.classes()] == ["n01", "n02", "n03", "n06"]
    got = folder_tests.drain(source)
    reasons = {k: r.reject for k, (r, _) in got.items() if r.reject}
    by_reason = {}
    for key, (reason, _) in reasons.items():
        by_reason.setdefault(reason, set()).add(key)
    assert by_reason["unsafe_member"] == {
        "train/n01/_unsafe/link.JPEG", "train/n01/_unsafe/hard.JPEG",
        "train/n01/_unsafe/../up.JPEG", "train/n01/_unsafe//abs.JPEG",
        "train/n01/_unsafe/dev.JPEG",
        "train/_unexpected/n04.tar", "train/_unexpected/../evil.tar",
        "train/_unexpected//abs.tar", "train/_unexpected/n05", "train/_unexpected/fifo.tar",
        "validation/_unexpected/ILSVRC2012_val_00000002.JPEG.lnk",
        "validation/_unexpected/../ILSVRC2012_val_00000003.JPEG",
    }
    assert by_reason["unexpected_name"] == {"train/n01/sub/nested.JPEG",
                                            "train/n01/.hidden.JPEG",
                                            "train/_unexpected/readme.txt"}
    assert by_reason["too_large"] == {"train/n01/big.JPEG"}
    assert by_reason["error"] == {"train/n06/_archive_error"}
    assert "not a tar" in reasons["train/n06/_archive_error"][1] or \
        "unreadable inner tar" in reasons["train/n06/_archive_error"][1]
    assert got["train/n01/dot.JPEG"][1] == good
    # One record per member: 8 good images + 9 odd inner + 7 odd outer + 2 odd val members.
    assert len(got) == 8 + 9 + 7 + 2


def test_truncated_inner_tar_never_reads_the_next_member(tmp_path):
    first = folder_tests.image_bytes(40, size=(40, 40))
    inner = tar_bytes([("a.JPEG", folder_tests.image_bytes(41)), ("b.JPEG", first)])
    with tarfile.open(fileobj=io.BytesIO(inner)) as tf:
        b_data = tf.getmember("b.JPEG").offset_data
    cut = inner[:b_data + 100]  # a whole, b's header, the start of b's data
    outer = tmp_path / "train.tar"
    outer.write_bytes(tar_bytes([("n01.tar", cut), ("n02.tar", tar_bytes([("c.JPEG", first)]))]))
    source = TarSource(str(outer))
    got = folder_tests.drain(source)
    assert got["train/n01/a.JPEG"][1] == folder_tests.image_bytes(41)
    assert got["train/n01/b.JPEG"][0].reject[0] == "truncated"
    assert got["train/n02/c.JPEG"][1] == first


def test_window_is_bounded(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    with open(path, "rb") as fh:
        w = Window(fh, 10, 20)
        assert w.read(5) == bytes(range(10, 15))
        w.seek(15)
        assert w.read(100) == bytes(range(25, 30))
        assert w.read(1) == b""
        w.seek(-3, 2)
        assert w.read() == bytes(range(27, 30))


def test_single_val_tar_needs_classes_and_ground_truth(tmp_path):
    tree = tmp_path / "tree"
    folder_tests.build_imagenet_tree(tree)
    tars = tars_from_tree(tree, tmp_path / "tars")
    val = tars / VAL_TAR
    with pytest.raises(ValueError, match="synsets_file"):
        TarSource(str(val), val_ground_truth_file=str(tree / "gt.txt"))
    (tmp_path / "s.txt").write_text("n01\nn02\nn03\n")
    with pytest.raises(ValueError, match="val_ground_truth_file"):
        TarSource(str(val), synsets_file=str(tmp_path / "s.txt"))
    got = folder_tests.drain(TarSource(str(val), synsets_file=str(tmp_path / "s.txt"),
                                       val_ground_truth_file=str(tree / "gt.txt")))
    assert sorted((k, r.label) for k, (r, _) in got.items()) == [
        ("validation/n01/ILSVRC2012_val_00000002.JPEG", 0),
        ("validation/n02/ILSVRC2012_val_00000001.JPEG", 1),
        ("validation/n03/ILSVRC2012_val_00000003.JPEG", 2)]


def test_structural_errors(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        TarSource(str(tmp_path))
    gz = tmp_path / "x.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        add_file(tf, "n01.tar", b"x")
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        TarSource(str(gz))
    outer = tmp_path / "t.tar"
    outer.write_bytes(tar_bytes([("n01.tar", tar_bytes([("a.JPEG", b"x")]))]))
    (tmp_path / "s.txt").write_text("n01\nn02\n")
    with pytest.raises(ValueError, match="synsets_file: .*'n02'"):
        TarSource(str(outer), synsets_file=str(tmp_path / "s.txt"))


def test_loader_reports_a_file_cut_after_listing(tmp_path):
    outer = tmp_path / "t.tar"
    outer.write_bytes(tar_bytes([("n01.tar", tar_bytes([("a.JPEG", b"y" * 3000)]))]))
    source = TarSource(str(outer))
    unit = source.units()[0]
    records = list(source.records(unit))
    with open(outer, "r+b") as fh:
        fh.truncate(records[0].locator[0] + 10)
    with source.open_unit(unit) as load, pytest.raises(Rejected, match="truncated"):
        load(records[0])
