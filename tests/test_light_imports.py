"""What must work without TensorFlow: the whole ETL (Spark executors that only resize images do not
pay for TensorFlow) and the NumPy pruning maths, planning and settings.

Each check runs in a fresh interpreter where importing tensorflow or keras raises.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BLOCK = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Blocked())
"""

LIGHT_MODULES = (
    "common.settings", "common.paths", "common.ranking", "common.stop", "common.presets",
    "train.settings", "train.schedules",
    "lottery.prune.masks", "lottery.prune.criteria",
    "lottery.points.task", "lottery.grid.ids", "lottery.grid.settings", "lottery.grid.plan",
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _etl_modules() -> list[str]:
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in (REPO / "etl").rglob("*.py"))


def test_the_block_really_blocks_tensorflow():
    done = _run("import tensorflow")
    assert done.returncode != 0 and "blocked in this test" in done.stderr


@pytest.mark.parametrize("module", _etl_modules() + list(LIGHT_MODULES))
def test_module_imports_without_tensorflow(module):
    done = _run(f"import {module}")
    assert done.returncode == 0, done.stderr[-2000:]


def test_magnitude_masks_and_channel_ranking_compute_without_tensorflow():
    done = _run("""
import numpy as np
from lottery.prune import masks
from common.ranking import keep_mask
rng = np.random.default_rng(0)
weights = {"a/kernel": rng.normal(size=(20, 10)), "b/kernel": rng.normal(size=(10, 5))}
mask = masks.magnitude_mask(weights, sparsity=0.8, scope="global")
kept = sum(int(m.sum()) for m in mask.values())
print(kept, int(keep_mask(np.arange(10.0), 0.3).sum()))
""")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["50", "7"]
