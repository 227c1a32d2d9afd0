import numpy as np
import pytest

from lottery.prune.criteria import bn_scores, filter_scores, keep_mask


def test_l1_l2_score_each_output_filter_of_a_conv_kernel():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 4, 5))
    kernel[..., 2] *= 0.01
    l1 = filter_scores(kernel, "l1")
    l2 = filter_scores(kernel, "l2")
    assert l1.shape == l2.shape == (5,)
    np.testing.assert_allclose(l1[1], np.abs(kernel[..., 1]).sum())
    np.testing.assert_allclose(l2[3], np.linalg.norm(kernel[..., 3].ravel()))
    assert np.argmin(l1) == np.argmin(l2) == 2


def test_depthwise_channels_are_scored_along_their_input_axis():
    kernel = np.ones((3, 3, 6, 1))
    kernel[:, :, 4, :] = 0.0
    scores = filter_scores(kernel, "l1", channel_axis=2)
    assert scores.shape == (6,) and np.argmin(scores) == 4


def test_fpgm_prunes_the_filter_nearest_the_geometric_median_not_the_smallest():
    # Filters on a line: the middle one is the median; the smallest-norm one is an outlier.
    rows = np.array([[10.0, 0.0], [11.0, 0.0], [12.0, 0.0], [13.0, 0.0], [0.1, 0.0]])
    kernel = rows.T  # Dense kernel (in=2, out=5)
    fpgm = filter_scores(kernel, "fpgm")
    brute = [sum(np.linalg.norm(r - q) for q in rows) for r in rows]
    np.testing.assert_allclose(fpgm, brute, rtol=1e-9)
    assert np.argmin(fpgm) == 1 and np.argmin(filter_scores(kernel, "l2")) == 4


def test_keep_mask_prunes_rounded_fraction_lowest_first_ties_by_position():
    keep = keep_mask(np.array([3.0, 1.0, 1.0, 5.0, 0.5]), 0.5)  # round(2.5) = 3 pruned
    assert keep.tolist() == [True, False, False, True, False]
    assert keep_mask(np.ones(4), 0.5).tolist() == [False, False, True, True]
    assert keep_mask(np.ones(3), 0.99).sum() == 1  # never empties a layer


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_keep_mask_refuses_bad_ratio(bad):
    with pytest.raises(ValueError, match="ratio"):
        keep_mask(np.ones(3), bad)


def test_bad_criterion_and_nan_scores_are_named():
    with pytest.raises(ValueError, match="bn_scores"):
        filter_scores(np.ones((2, 2)), "bn")
    with pytest.raises(ValueError, match="NaN"):
        keep_mask(np.array([1.0, np.nan]), 0.5)
    np.testing.assert_array_equal(bn_scores(np.array([-2.0, 1.0])), [2.0, 1.0])
