"""lottery.prune.masks: magnitude masks, controls, IMP steps, sparsity and mask files (NumPy only)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lottery.prune import masks

REPO = Path(__file__).resolve().parents[3]


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "net/fc1/kernel": rng.normal(size=(20, 30)).astype(np.float32),
        "net/fc2/kernel": rng.normal(size=(30, 10)).astype(np.float32) * 0.1,
        "net/conv/kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
        "net/logits/kernel": rng.normal(size=(10, 3)).astype(np.float32),
    }


def _pruned(mask):
    return {n: int(m.size - np.count_nonzero(m)) for n, m in mask.items()}


def test_global_mask_prunes_exact_count_of_smallest_magnitudes():
    w = _weights()
    n = sum(a.size for a in w.values())
    mask = masks.global_magnitude_mask(w, 0.7)
    assert sum(_pruned(mask).values()) == int(np.floor(0.7 * n + 0.5))
    kept = np.concatenate([np.abs(w[k])[mask[k]] for k in w])
    gone = np.concatenate([np.abs(w[k])[~mask[k]] for k in w])
    assert gone.max() <= kept.min()
    # Global: the small-valued layer loses far more than its share.
    assert masks.mask_sparsity(mask)["layers"]["net/fc2/kernel"]["sparsity"] > 0.95
    assert all(m.dtype == np.bool_ and m.shape == w[k].shape for k, m in mask.items())


def test_ties_are_broken_deterministically_and_hit_the_sparsity_exactly():
    w = {"a/kernel": np.ones((7, 7), np.float32), "b/kernel": np.ones((5,), np.float32)}
    first = masks.global_magnitude_mask(w, 0.5)
    again = masks.global_magnitude_mask({k: v.copy() for k, v in reversed(list(w.items()))}, 0.5)
    assert sum(_pruned(first).values()) == 27  # round(0.5 * 54)
    for k in w:
        np.testing.assert_array_equal(first[k], again[k])
    layer = masks.layerwise_magnitude_mask(w, 0.5)
    assert _pruned(layer) == {"a/kernel": 25, "b/kernel": 3}  # halves round up


def test_layerwise_mask_same_fraction_in_each_layer():
    w = _weights()
    mask = masks.layerwise_magnitude_mask(w, 0.6)
    for name, m in mask.items():
        assert m.size - np.count_nonzero(m) == int(np.floor(0.6 * m.size + 0.5))
        assert np.abs(w[name])[~m].max() <= np.abs(w[name])[m].min()


def test_excluded_layers_are_kept_whole_and_unmatched_patterns_fail():
    w = _weights()
    mask = masks.global_magnitude_mask(w, 0.8, exclude=["logits", "*/conv/*"])
    assert mask["net/logits/kernel"].all() and mask["net/conv/kernel"].all()
    included = w["net/fc1/kernel"].size + w["net/fc2/kernel"].size
    assert sum(_pruned(mask).values()) == int(np.floor(0.8 * included + 0.5))
    with pytest.raises(ValueError, match="classifer"):
        masks.global_magnitude_mask(w, 0.5, exclude=["classifer"])


def test_bad_arguments_name_the_problem():
    w = _weights()
    with pytest.raises(ValueError, match="sparsity"):
        masks.global_magnitude_mask(w, 1.5)
    with pytest.raises(ValueError, match="scope"):
        masks.magnitude_mask(w, 0.5, scope="row")
    base = masks.global_magnitude_mask(w, 0.9)
    with pytest.raises(ValueError, match="already sparser"):
        masks.global_magnitude_mask(w, 0.5, base=base)


def test_base_mask_stays_pruned_and_counts():
    w = _weights()
    base = masks.global_magnitude_mask(w, 0.3)
    # Make a pruned weight large: it must stay pruned anyway.
    name = "net/fc1/kernel"
    idx = np.argwhere(~base[name])[0]
    w[name][tuple(idx)] = 100.0
    mask = masks.global_magnitude_mask(w, 0.6, base=base)
    assert not mask[name][tuple(idx)]
    for k in w:
        assert not (mask[k] & ~base[k]).any()
    n = sum(a.size for a in w.values())
    assert sum(_pruned(mask).values()) == int(np.floor(0.6 * n + 0.5))


def test_mask_from_quantile_uses_the_stats_threshold():
    w = _weights()
    every = np.abs(np.concatenate([a.ravel() for a in w.values()]).astype(np.float64))
    t = np.quantile(every, 0.75)
    mask = masks.mask_from_quantile(w, 0.75)
    for k in w:
        np.testing.assert_array_equal(mask[k], np.abs(w[k]) >= t)
    assert masks.mask_sparsity(mask)["overall"] == pytest.approx(0.75, abs=1.0 / every.size)
    per_layer = masks.mask_from_quantile(w, 0.5, scope="layer", exclude=["logits"])
    assert per_layer["net/logits/kernel"].all()
    for k in ("net/fc1/kernel", "net/fc2/kernel"):
        assert per_layer[k].mean() == pytest.approx(0.5, abs=0.01)


def test_random_mask_like_keeps_counts_moves_positions():
    w = _weights()
    mask = masks.layerwise_magnitude_mask(w, 0.8, exclude=["logits"])
    r1 = masks.random_mask_like(mask, seed=3)
    r2 = masks.random_mask_like(mask, seed=3)
    r3 = masks.random_mask_like(mask, seed=4)
    assert _pruned(r1) == _pruned(mask)
    assert r1["net/logits/kernel"].all()
    for k in mask:
        np.testing.assert_array_equal(r1[k], r2[k])
    assert not np.array_equal(r1["net/fc1/kernel"], mask["net/fc1/kernel"])
    assert not np.array_equal(r1["net/fc1/kernel"], r3["net/fc1/kernel"])


def test_prune_remaining_prunes_a_fraction_of_what_is_left():
    w = _weights()
    m1 = masks.prune_remaining(w, masks.ones_like(w), 0.2, exclude=["logits"])
    included = sum(w[k].size for k in w if "logits" not in k)
    left1 = included - sum(_pruned(m1).values())
    assert left1 == included - int(np.floor(0.2 * included + 0.5))
    m2 = masks.prune_remaining(w, m1, 0.2, exclude=["logits"])
    left2 = included - sum(_pruned(m2).values())
    assert left2 == left1 - int(np.floor(0.2 * left1 + 0.5))
    for k in w:
        assert not (m2[k] & ~m1[k]).any()
    per_layer = masks.prune_remaining(w, m1, 0.5, scope="layer")
    for k in w:
        kept = np.count_nonzero(m1[k])
        assert np.count_nonzero(per_layer[k]) == kept - int(np.floor(0.5 * kept + 0.5))


def test_structured_per_channel_entries_broadcast():
    shapes = {"c/kernel": (3, 3, 2, 4), "d/kernel": (6, 5)}
    mask = {"c/kernel": np.array([True, False, True, False]), "d/kernel": np.ones((6, 5), bool)}
    s = masks.mask_sparsity(mask, shapes)
    assert s["layers"]["c/kernel"] == {"total": 72, "pruned": 36, "sparsity": 0.5}
    assert s["total"] == 102 and s["pruned"] == 36 and s["overall"] == pytest.approx(36 / 102)
    full = masks.expand(mask["c/kernel"], shapes["c/kernel"])
    assert full.shape == (3, 3, 2, 4) and not full[..., 1].any() and full[..., 0].all()
    with pytest.raises(ValueError, match="broadcast"):
        masks.expand(np.ones(3, bool), (3, 3, 2, 4))


def test_save_and_load_round_trip(tmp_path):
    w = _weights()
    mask = masks.global_magnitude_mask(w, 0.5)
    mask["deep/nested/block/kernel"] = np.array([True, False, True])  # structured entry, nested name
    path = tmp_path / "masks" / "global-s5000.npz"
    meta = {"mask_id": "global-s5000", "sparsity": masks.mask_sparsity(mask)["overall"]}
    masks.save_mask(path, mask, meta)
    assert sorted(os.listdir(path.parent)) == ["global-s5000.npz"]  # no temporary left behind
    loaded, loaded_meta = masks.load_mask(path)
    assert loaded_meta == meta
    assert sorted(loaded) == sorted(mask)
    for k in mask:
        assert loaded[k].dtype == np.bool_
        np.testing.assert_array_equal(loaded[k], mask[k])


def test_load_refuses_pickles_oversize_and_bad_names(tmp_path):
    pickled = tmp_path / "evil.npz"
    np.savez(pickled, **{"a/kernel": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ValueError, match="evil.npz"):
        masks.load_mask(pickled)

    floats = tmp_path / "floats.npz"
    np.savez(floats, **{"a/kernel": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="dtype"):
        masks.load_mask(floats)

    big = tmp_path / "big.npz"
    masks.save_mask(big, {"a/kernel": np.ones((1000, 1000), bool)})
    with pytest.raises(ValueError, match="over the limit"):
        masks.load_mask(big, max_bytes=100_000)
    assert masks.load_mask(big)[0]["a/kernel"].all()

    escaping = tmp_path / "escape.npz"
    with zipfile.ZipFile(escaping, "w") as zf:
        zf.writestr("../up/kernel.npy", b"")
    with pytest.raises(ValueError, match="invalid weight name"):
        masks.load_mask(escaping)

    for bad in ("../x", "/abs", "__meta__", "a//b", ""):
        with pytest.raises(ValueError, match="invalid weight name"):
            masks.save_mask(tmp_path / "bad.npz", {bad: np.ones(2, bool)})
    assert not (tmp_path / "bad.npz").exists()

    with pytest.raises(ValueError, match="not a readable mask"):
        (tmp_path / "junk.npz").write_bytes(b"not a zip")
        masks.load_mask(tmp_path / "junk.npz")


def test_the_size_limit_is_an_argument_not_the_environment(tmp_path):
    """The environment at import time does not change what load_mask accepts: only max_bytes does."""
    path = tmp_path / "m.npz"
    masks.save_mask(path, {"a/kernel": np.ones((10, 10), bool)})
    code = ("import sys; from lottery.prune import masks; "
            "print(int(masks.load_mask(sys.argv[1])[0]['a/kernel'].sum()), masks.MAX_MASK_BYTES)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "BIGTICKET_MAX_MASK_BYTES": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["100", str(4 << 30)]
    with pytest.raises(ValueError, match="over the limit of 50"):
        masks.load_mask(path, max_bytes=50)
