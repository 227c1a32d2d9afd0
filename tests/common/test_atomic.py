import os

import pytest

from common.atomic import atomic_output, read_json, write_json


def test_failed_write_leaves_nothing_under_final_name(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as fh:
            fh.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_write_replaces_atomically(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_json(target, {"v": 1})
    write_json(target, {"v": 2})
    assert read_json(target) == {"v": 2}
    assert sorted(os.listdir(target.parent)) == ["b.json"]


def test_outputs_are_readable_by_others(tmp_path):
    target = tmp_path / "manifest.json"
    write_json(target, {})
    assert target.stat().st_mode & 0o044 == 0o044
