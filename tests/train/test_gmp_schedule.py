"""The GMP sparsity schedule against the formula, its update steps, and the settings' checks."""
from __future__ import annotations

import numpy as np
import pytest

from common.settings import make_settings
from train.gmp_schedule import SparsitySchedule
from train.magnitude import magnitude_mask
from train.settings import DenseSettings


def _by_hand(t, initial, final, begin, end, power):
    p = (t - begin) / (end - begin)
    p = 0.0 if p < 0 else 1.0 if p > 1 else p
    return final + (initial - final) * (1 - p) ** power


def test_polynomial_matches_the_formula_for_a_thousand_random_parameter_sets():
    rng = np.random.default_rng(12)
    worst = 0.0
    for _ in range(1000):
        initial = float(rng.uniform(0, 0.5))
        final = float(rng.uniform(initial, 0.99))
        begin = int(rng.integers(0, 500))
        end = begin + int(rng.integers(1, 5000))
        power = float(rng.uniform(0.5, 6))
        schedule = SparsitySchedule("polynomial", initial, final, begin, end, power,
                                    int(rng.integers(1, 300)))
        for t in rng.integers(begin, end + 200, size=20).tolist() + [begin, end]:
            worst = max(worst, abs(schedule.sparsity(t) - _by_hand(t, initial, final, begin, end, power)))
        assert schedule.sparsity(begin) == pytest.approx(initial, abs=1e-12)
        assert schedule.sparsity(end) == final
    assert worst < 1e-6


def test_updates_at_begin_plus_k_frequency_and_a_forced_last_one_at_end():
    s = SparsitySchedule("polynomial", 0.1, 0.9, begin=10, end=45, power=3, frequency=10)
    assert s.update_steps() == [10, 20, 30, 40, 45]          # 45 - 10 is no multiple of 10
    assert [t for t in range(0, 100) if s.is_update_step(t)] == s.update_steps()
    assert s.last_update_at_or_before(44) == 40 and s.last_update_at_or_before(9) is None
    assert s.last_update_at_or_before(99) == 45
    exact = SparsitySchedule("polynomial", 0.0, 0.5, begin=0, end=40, frequency=10)
    assert exact.update_steps() == [0, 10, 20, 30, 40]       # no extra update when it divides
    const = SparsitySchedule("constant", 0.0, 0.7, begin=5, end=20, frequency=5)
    assert [const.sparsity(t) for t in (4, 5, 20)] == [0.0, 0.7, 0.7]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_masks_grown_along_the_schedule_reach_the_final_sparsity_exactly(scope):
    rng = np.random.default_rng(3)
    weights = {"m/a/kernel": rng.normal(size=(37, 11)), "m/b/kernel": rng.normal(size=(5, 5, 3, 7))}
    s = SparsitySchedule("polynomial", 0.05, 0.93, begin=0, end=23, frequency=4)
    mask = None
    for step in s.update_steps():
        new = magnitude_mask(weights, s.sparsity(step), scope, base=mask)
        if mask is not None:  # never revives a pruned weight
            assert all(not (new[n] & ~mask[n]).any() for n in weights)
        mask = new
    if scope == "global":
        total = sum(w.size for w in weights.values())
        assert sum(int((~m).sum()) for m in mask.values()) == int(np.floor(0.93 * total + 0.5))
    else:
        for n, w in weights.items():
            assert int((~mask[n]).sum()) == int(np.floor(0.93 * w.size + 0.5))


BASE = {"data": "d", "model": "lenet_300_100"}


@pytest.mark.parametrize("values, field", [
    ({"gmp_final_sparsity": 0.5}, "gmp_final_sparsity: a GMP setting, but gmp_schedule is 'none'"),
    ({"gmp_schedule": "polynomial"}, "gmp_final_sparsity: required"),
    ({"gmp_schedule": "polynomial", "gmp_initial_sparsity": 0.6, "gmp_final_sparsity": 0.5},
     "gmp_final_sparsity: 0.5 is below gmp_initial_sparsity"),
    ({"gmp_schedule": "polynomial", "gmp_final_sparsity": 0.5, "gmp_begin_step": 50,
      "gmp_end_step": 50}, "gmp_end_step: 50 must be after gmp_begin_step"),
    ({"gmp_schedule": "constant", "gmp_final_sparsity": 0.5, "gmp_initial_sparsity": 0.1},
     "gmp_initial_sparsity: the constant schedule"),
])
def test_settings_refuse_inconsistent_schedules_naming_the_field(values, field):
    with pytest.raises(Exception, match=field):
        make_settings(DenseSettings, {**BASE, **values})


def test_gmp_fields_at_their_defaults_leave_the_run_identity_alone():
    from common.settings import identity_hash
    from train.settings import LATER_FIELD_DEFAULTS, NON_IDENTITY_FIELDS

    plain = make_settings(DenseSettings, BASE)
    gmp = make_settings(DenseSettings, {**BASE, "gmp_schedule": "polynomial", "gmp_final_sparsity": 0.9})
    h = [identity_hash(s, neutral=NON_IDENTITY_FIELDS, omit_defaults=LATER_FIELD_DEFAULTS) for s in (plain, gmp)]
    assert h[0] != h[1]
    assert all(k in LATER_FIELD_DEFAULTS for k in ("gmp_schedule", "gmp_final_sparsity", "gmp_exclude"))
