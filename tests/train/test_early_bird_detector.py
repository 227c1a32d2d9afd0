"""Early-Bird detector maths on constructed masks, and BN channel masks of real (tiny) Keras models."""
from __future__ import annotations

import numpy as np
import pytest

from train.early_bird import EarlyBirdDetector, bn_channel_mask, bn_layers, distance_matrix, hamming
from train.models import build_model


def test_hamming_is_the_fraction_of_positions_that_differ():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    b = a.copy()
    assert hamming(a, b) == 0.0
    b[[0, 5]] = ~b[[0, 5]]
    assert hamming(a, b) == pytest.approx(2 / 8)
    assert hamming(a, ~a) == 1.0
    with pytest.raises(ValueError, match="different lengths"):
        hamming(a, a[:-1])


def test_distance_matrix_is_symmetric_with_a_zero_diagonal_and_matches_hamming():
    rng = np.random.default_rng(0)
    masks = [rng.random(50) < 0.5 for _ in range(6)]
    d = distance_matrix(masks)
    assert d.shape == (6, 6)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    np.testing.assert_array_equal(d, d.T)
    for i in range(6):
        for j in range(6):
            assert d[i, j] == pytest.approx(hamming(masks[i], masks[j]))


def _masks_with_distances(distances, n=100):
    """Masks whose consecutive Hamming distances are exactly `distances` (flip k fresh bits)."""
    mask = np.ones(n, dtype=bool)
    out = [mask.copy()]
    position = 0
    for d in distances:
        k = int(round(d * n))
        flip = np.arange(position, position + k) % n
        position += k
        mask = mask.copy()
        mask[flip] = ~mask[flip]
        out.append(mask)
    return out


@pytest.mark.parametrize("window", [2, 3, 5])
def test_drawn_at_the_first_epoch_whose_last_window_masks_are_all_close(window):
    # Distances between consecutive masks: large, then settling under 0.1 with one relapse.
    distances = [0.4, 0.3, 0.05, 0.02, 0.2, 0.05, 0.04, 0.03, 0.02, 0.01, 0.0]
    masks = _masks_with_distances(distances)
    detector = EarlyBirdDetector(ratio=0.5, window=window, threshold=0.1)
    drawn_at = None
    for epoch, mask in enumerate(masks, start=1):
        drawn = detector.update(epoch, mask)
        record = detector.records[-1]
        # window masks = window - 1 distances; nothing can be decided before they exist
        if epoch < window:
            assert record["window_max"] is None and not drawn
        else:
            recent = distances[epoch - window:epoch - 1]
            assert record["window_max"] == pytest.approx(max(recent))
        if drawn and drawn_at is None:
            drawn_at = epoch
    expected = next(e for e in range(window, len(masks) + 1)
                    if max(distances[e - window:e - 1]) < 0.1)
    assert drawn_at == expected == detector.drawn_epoch
    assert detector.records[0]["distance"] is None
    assert [r["distance"] for r in detector.records[1:]] == pytest.approx(distances)


def test_threshold_is_strict_and_never_drawn_when_masks_keep_moving():
    detector = EarlyBirdDetector(ratio=0.5, window=2, threshold=0.1)
    for epoch, mask in enumerate(_masks_with_distances([0.1] * 6), start=1):
        assert not detector.update(epoch, mask)  # exactly at the threshold is not under it
    assert detector.drawn_epoch is None


def test_the_draw_is_final_and_epochs_must_increase():
    masks = _masks_with_distances([0.0, 0.5, 0.5])
    detector = EarlyBirdDetector(window=2)
    assert [detector.update(e, m) for e, m in enumerate(masks, start=1)] == [False, True, True, True]
    assert detector.drawn_epoch == 2
    with pytest.raises(ValueError, match="epoch order"):
        detector.update(4, masks[0])


@pytest.mark.parametrize("kwargs, field", [
    ({"ratio": 0.0}, "ratio"), ({"ratio": 1.0}, "ratio"), ({"window": 1}, "window"),
    ({"threshold": 0.0}, "threshold"),
])
def test_bad_detector_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EarlyBirdDetector(**kwargs)


@pytest.fixture(scope="module")
def resnet():
    return build_model("resnet20", 10, 8, width=2)


def test_bn_channel_mask_is_one_global_threshold_over_every_gamma_in_layer_order(resnet):
    import keras

    layers = bn_layers(resnet)
    bns = [l for l in resnet.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert [name for name, _ in layers] == [l.name for l in bns]
    assert [c for _, c in layers] == [l.gamma.shape[0] for l in bns]
    rng = np.random.default_rng(1)
    gammas = [rng.normal(size=l.gamma.shape).astype("float32") for l in bns]
    for layer, g in zip(bns, gammas):
        layer.gamma.assign(g)
    flat = np.abs(np.concatenate(gammas))
    for ratio in (0.3, 0.5):
        mask = bn_channel_mask(resnet, ratio)
        assert mask.dtype == bool and mask.size == flat.size
        assert (~mask).sum() == int(np.floor(ratio * flat.size + 0.5))
        # every pruned |gamma| is at most every kept one: one threshold for the whole network
        assert flat[~mask].max() <= flat[mask].min()


def test_nested_backbones_are_walked_and_models_without_batchnorm_are_refused():
    mobilenet = build_model("mobilenet_v2", 10, 8, alpha=0.35)
    backbone = next(l for l in mobilenet.layers if hasattr(l, "layers"))
    import keras

    inner = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bn_layers(mobilenet)) == len(inner) > 10
    assert bn_channel_mask(mobilenet, 0.5).size == sum(l.gamma.shape[0] for l in inner)
    with pytest.raises(ValueError, match="lenet_300_100.*no BatchNorm"):
        bn_channel_mask(build_model("lenet_300_100", 10, 8), 0.5)
