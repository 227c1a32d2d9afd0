"""Channel groups, channel selection and structured masking on real (tiny) Keras models."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lottery.prune.channel_graph import channel_groups  # noqa: E402
from lottery.prune.channel_masks import apply_structured, select_channels  # noqa: E402
from lottery.prune.masks import load_mask, save_mask  # noqa: E402
from train.models import build_model  # noqa: E402

L = keras.layers


def _group_of(groups, layer):
    """The group whose output channels `layer` produces."""
    hits = [g for g in groups if layer in g.producers]
    assert len(hits) == 1, f"{layer} produces into {len(hits)} groups"
    return hits[0]


def _producers_everywhere_once(model, groups):
    """Every Conv2D / Dense of the model (nested included) produces into exactly one group."""
    weighted = [l.name for l in model._flatten_layers(include_self=False, recursive=True)
                if type(l) in (L.Conv2D, L.Dense)]
    produced = [p for g in groups for p in g.producers]
    assert sorted(produced) == sorted(weighted)


# ------------------------------------------------------------------------------------ groups
@pytest.mark.parametrize("depth", [20, 44, 56])
def test_resnet_residual_stages_form_one_group_each(depth):
    model = build_model(f"resnet{depth}", 10, 8, width=2)
    groups = channel_groups(model)
    _producers_everywhere_once(model, groups)
    blocks = (depth - 2) // 6
    stage1 = _group_of(groups, "stem_conv")
    assert set(stage1.producers) == {"stem_conv"} | {f"s1b{b}_conv2" for b in range(1, blocks + 1)}
    # Consumers: every first conv of stage 1, plus stage 2's first conv and its projection.
    assert {c for c, _ in stage1.consumers} == ({f"s1b{b}_conv1" for b in range(1, blocks + 1)}
                                                | {"s2b1_conv1", "s2b1_proj"})
    assert set(stage1.bn_gammas) == {"stem_bn/gamma"} | {f"s1b{b}_bn2/gamma" for b in range(1, blocks + 1)}
    for stage in (2, 3):
        joined = _group_of(groups, f"s{stage}b1_proj")
        assert set(joined.producers) == ({f"s{stage}b1_proj"}
                                         | {f"s{stage}b{b}_conv2" for b in range(1, blocks + 1)})
        assert joined.prunable
    inner = _group_of(groups, "s2b2_conv1")
    assert inner.producers == ("s2b2_conv1",) and inner.consumers == (("s2b2_conv2", 1),)
    assert inner.bn_layers == ("s2b2_bn1",) and inner.width == 4
    assert ("logits", 1) in _group_of(groups, "s3b1_proj").consumers
    logits = _group_of(groups, "logits")
    assert not logits.prunable and logits.reasons
    # input + 3 residual stages + one group per block's first conv + logits
    assert len(groups) == 1 + 3 + 3 * blocks + 1


def test_mobilenet_v2_groups_follow_the_nested_backbone():
    model = build_model("mobilenet_v2", 10, 16, alpha=0.35)
    groups = channel_groups(model)
    _producers_everywhere_once(model, groups)
    expand = _group_of(groups, "block_2_expand")
    # expand 1x1 -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project 1x1: one group.
    assert expand.depthwise == ("block_2_depthwise",)
    assert set(expand.bn_layers) == {"block_2_expand_BN", "block_2_depthwise_BN"}
    assert expand.consumers == (("block_2_project", 1),) and expand.prunable
    strided = _group_of(groups, "block_3_expand")  # ZeroPadding2D before a strided depthwise
    assert strided.depthwise == ("block_3_depthwise",) and strided.prunable
    # block_2_add joins block_1's and block_2's projections; stage 3 (blocks 3-5) joins three.
    assert set(_group_of(groups, "block_1_project").producers) == {"block_1_project", "block_2_project"}
    assert set(_group_of(groups, "block_3_project").producers) == {f"block_{i}_project" for i in (3, 4, 5)}
    stem = _group_of(groups, "Conv1")
    assert stem.depthwise == ("expanded_conv_depthwise",)
    # The backbone's last conv feeds our outer classifier through the nested model's output.
    assert _group_of(groups, "Conv_1").consumers == (("logits", 1),)
    image = [g for g in groups if g.id.startswith("input:")]
    assert len(image) == 1 and not image[0].prunable and image[0].consumers == (("Conv1", 1),)
    assert not _group_of(groups, "logits").prunable


def test_conv_small_flatten_maps_conv_channels_to_dense_rows():
    model = build_model("conv_small", 10, 8, width=0.125, dense=16)
    groups = channel_groups(model)
    _producers_everywhere_once(model, groups)
    last_conv = _group_of(groups, "conv2b")
    flat_in = model.get_layer("flatten").input.shape
    assert last_conv.consumers == (("fc1", int(flat_in[1] * flat_in[2])),)
    assert last_conv.width == 16 and last_conv.prunable


def test_lenet_hidden_layers_are_prunable_and_the_classifier_is_not():
    groups = channel_groups(build_model("lenet_300_100", 10, 8))
    by_id = {g.id: g for g in groups}
    assert by_id["fc1"].prunable and by_id["fc1"].width == 300 and by_id["fc1"].consumers == (("fc2", 1),)
    assert by_id["fc2"].consumers == (("logits", 1),)
    assert not by_id["logits"].prunable


def test_layers_that_cannot_be_followed_pin_their_groups():
    inp = keras.Input((6, 6, 3), name="x")
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    b = L.Conv2D(4, 3, padding="same", name="b")(inp)
    cat = L.Concatenate(name="cat")([a, b])                              # not followed
    c = L.Conv2D(5, 1, activation="sigmoid", name="c")(cat)              # sigmoid(0) != 0
    d = L.Conv2D(6, 1, name="d")(c)
    e = L.PReLU(name="prelu")(d)                                         # per-channel weights
    f = L.Conv2D(3, 1, name="f")(e)
    g = L.Conv2D(7, 1, activation="relu", name="g")(f)
    out = L.Dense(2, name="logits")(L.GlobalAveragePooling2D(name="gap")(g))
    groups = channel_groups(keras.Model(inp, out))
    for name in "abcd":
        assert not _group_of(groups, name).prunable, name
    assert any("cat" in r for r in _group_of(groups, "a").reasons)
    assert any("sigmoid" in r for r in _group_of(groups, "c").reasons)
    assert _group_of(groups, "f").prunable and _group_of(groups, "g").prunable


def test_models_that_are_not_functional_are_refused():
    seq = keras.Sequential([keras.Input((4,)), L.Dense(3, name="h"), L.Dense(2, name="o")])
    with pytest.raises(ValueError, match="functional"):
        channel_groups(seq)


# ---------------------------------------------------------------------------------- selection
def _conv_net(kernels):
    """x -> conv a (1x1, the given filters as rows) -> conv b -> gap -> logits."""
    inp = keras.Input((3, 3, 2), name="x")
    y = L.Conv2D(len(kernels), 1, name="a")(inp)
    y = L.Conv2D(3, 1, name="b")(y)
    model = keras.Model(inp, L.Dense(2, name="logits")(L.GlobalAveragePooling2D(name="gap")(y)))
    layer = model.get_layer("a")
    layer.kernel.assign(np.asarray(kernels, dtype="float32").T.reshape(1, 1, 2, len(kernels)))
    return model


def test_l1_l2_fpgm_pick_different_filters():
    # l1 = 3, 4, 10, 10.5, 11 (prunes 0); l2 = 3, 2.83, ... (prunes 1); fpgm prunes the filter
    # nearest the cluster's geometric median, which is neither.
    filters = [[3, 0], [2, 2], [5, 5], [5.5, 5], [6, 5]]
    model = _conv_net(filters)
    kept = {c: select_channels(model, c, 0.2)["a/kernel"] for c in ("l1", "l2", "fpgm")}
    assert kept["l1"].tolist() == [False, True, True, True, True]
    assert kept["l2"].tolist() == [True, False, True, True, True]
    rows = np.asarray(filters, dtype=float)
    median = int(np.argmin([sum(np.linalg.norm(r - q) for q in rows) for r in rows]))
    assert median not in (0, 1)
    assert kept["fpgm"].tolist() == [i != median for i in range(5)]


def test_joined_groups_sum_scores_over_their_producers():
    inp = keras.Input((3, 3, 1), name="x")
    a = L.Conv2D(4, 1, use_bias=False, name="a")(inp)
    b = L.Conv2D(4, 1, use_bias=False, name="b")(inp)
    s = L.ReLU(name="r")(L.Add(name="add")([a, b]))
    model = keras.Model(inp, L.Dense(2, name="logits")(L.Flatten(name="flat")(L.Conv2D(3, 1, name="c")(s))))
    model.get_layer("a").kernel.assign(np.array([1, 2, 3, 4], "float32").reshape(1, 1, 1, 4))
    model.get_layer("b").kernel.assign(np.array([4, 3, 0.1, 4], "float32").reshape(1, 1, 1, 4))
    mask = select_channels(model, "l1", 0.25)
    # Sums 5, 5, 3.1, 8: channel 2 goes, although a's own ranking would drop channel 0.
    assert mask["a/kernel"].tolist() == mask["b/kernel"].tolist() == [True, True, False, True]
    assert mask["c/kernel"].any(axis=1).tolist() == [True, True, False, True]   # c's input rows


def test_bn_global_scope_is_one_threshold_and_layer_scope_is_per_group():
    inp = keras.Input((3, 3, 2), name="x")
    y = L.BatchNormalization(name="p_bn")(L.Conv2D(4, 1, name="p")(inp))
    y = L.BatchNormalization(name="q_bn")(L.Conv2D(4, 1, name="q")(y))
    net = keras.Model(inp, L.Dense(2, name="logits")(L.GlobalAveragePooling2D(name="gap")(y)))
    net.get_layer("p_bn").gamma.assign(np.array([-0.9, 0.8, 0.05, 0.7], "float32"))
    net.get_layer("q_bn").gamma.assign(np.array([0.3, 0.2, 0.25, 0.4], "float32"))
    glob = select_channels(net, "bn", 0.5)                    # default scope for bn: global
    assert glob.meta["scope"] == "global"
    assert glob["p_bn/gamma"].tolist() == [True, True, False, True]   # |-0.9| is large
    assert glob["q_bn/gamma"].tolist() == [False, False, False, True]
    layer = select_channels(net, "bn", 0.5, scope="layer")
    assert layer["p_bn/gamma"].tolist() == [True, True, False, False]
    assert layer["q_bn/gamma"].tolist() == [True, False, False, True]


def test_global_scope_never_empties_a_group():
    model = build_model("lenet_300_100", 10, 4)
    fc2 = model.get_layer("fc2")
    fc2.kernel.assign(fc2.kernel.numpy() * 1e-6)  # every fc2 unit scores below every fc1 unit
    mask = select_channels(model, "l1", 0.25, scope="global")   # 100 of 400: all of fc2
    assert mask["fc2/bias"].sum() == 1
    groups = {g["id"]: g for g in mask.meta["groups"]}
    assert groups["fc2"]["kept"] == 1 and groups["fc1"]["kept"] == 300


def test_exclude_keeps_every_group_touching_the_layer():
    model = build_model("resnet20", 10, 8, width=4)
    mask = select_channels(model, "l1", 0.5, exclude=["s1b1_conv1"])
    groups = {g["id"]: g for g in mask.meta["groups"]}
    assert groups["s1b1_conv1"]["kept"] == 4 and not groups["s1b1_conv1"]["prunable"]
    assert groups["stem_conv"]["kept"] == 4          # s1b1_conv1 consumes the stage-1 group
    assert groups["s2b1_conv1"]["kept"] == groups["s2b1_conv1"]["width"] // 2   # others still pruned
    assert "s1b1_conv1/kernel" not in mask
    with pytest.raises(ValueError, match="nosuchlayer"):
        select_channels(model, "l1", 0.5, exclude=["nosuchlayer*"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(criterion="l3", ratio=0.5), "criterion"),
    (dict(criterion="l1", ratio=1.0), "ratio"),
    (dict(criterion="l1", ratio=0.5, scope="net"), "scope"),
    (dict(criterion="bn", ratio=0.5), "BatchNorm"),
])
def test_bad_arguments_are_named(kwargs, match):
    model = build_model("lenet_300_100", 10, 4)
    with pytest.raises(ValueError, match=match):
        select_channels(model, **kwargs)


def test_mask_entries_meta_and_file_round_trip(tmp_path):
    model = build_model("conv_small", 10, 8, width=0.125, dense=16)
    mask = select_channels(model, "l2", 0.5)
    assert mask["conv1a/kernel"].shape == (8,) and mask["conv1a/bias"].shape == (8,)
    assert mask["conv2a/kernel"].shape == (8, 16)                       # inputs and outputs pruned
    flat = model.get_layer("flatten").output.shape[-1]
    assert mask["fc1/kernel"].shape == (flat, 16)
    # Dense rows after Flatten: row i belongs to channel i % C.
    channel_keep = mask["conv2b/bias"]
    np.testing.assert_array_equal(mask["fc1/kernel"].any(axis=1), np.tile(channel_keep, flat // 16))
    assert mask["logits/kernel"].shape == (16, 1)
    assert "logits/bias" not in mask
    meta = mask.meta
    assert (meta["criterion"], meta["ratio"], meta["scope"]) == ("l2", 0.5, "layer")
    assert meta["pruned_channels"] == sum(g["width"] - g["kept"] for g in meta["groups"])
    save_mask(tmp_path / "m.npz", mask, mask.meta)
    loaded, loaded_meta = load_mask(tmp_path / "m.npz")
    assert loaded_meta == meta and set(loaded) == set(mask)
    for k in mask:
        np.testing.assert_array_equal(loaded[k], mask[k])


# ----------------------------------------------------------------------------------- masking
def _randomise_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.beta.assign(rng.normal(0, 0.3, n))
            layer.moving_mean.assign(rng.normal(0, 0.3, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2, n))


def test_apply_structured_makes_pruned_channels_exactly_zero():
    keras.utils.set_random_seed(0)
    model = build_model("resnet20", 10, 8, width=4)
    _randomise_bn(model)
    mask = select_channels(model, "fpgm", 0.5)
    apply_structured(model, mask)
    for gname in ("s1b1_bn1", "stem_bn"):
        keep = mask[f"{gname}/gamma"]
        bn = model.get_layer(gname)
        assert not bn.gamma.numpy()[~keep].any() and not bn.beta.numpy()[~keep].any()
        assert bn.gamma.numpy()[keep].all()
    probe = keras.Model(model.input, [model.get_layer("s1b1_relu1").output, model.get_layer("s1b2_out").output])
    x = np.random.default_rng(1).uniform(0, 255, (3, 8, 8, 3)).astype("float32")
    inner, residual = (np.asarray(t) for t in probe(x))
    assert not inner[..., ~mask["s1b1_bn1/gamma"]].any() and inner[..., mask["s1b1_bn1/gamma"]].any()
    assert not residual[..., ~mask["stem_bn/gamma"]].any() and residual[..., mask["stem_bn/gamma"]].any()


def test_apply_structured_refuses_masks_that_are_not_exact_channel_masks():
    model = build_model("lenet_300_100", 10, 4)
    before = model.get_layer("fc1").kernel.numpy().copy()
    mask = dict(select_channels(model, "l1", 0.5))
    elementwise = dict(mask, **{"fc1/kernel": np.random.default_rng(0).random((48, 300)) > 0.5})
    with pytest.raises(ValueError, match="fc1/kernel"):
        apply_structured(model, elementwise)
    without_bias = {k: v for k, v in mask.items() if k != "fc1/bias"}
    with pytest.raises(ValueError, match="fc1/bias"):
        apply_structured(model, without_bias)
    with pytest.raises(ValueError, match="not prunable"):
        apply_structured(model, {"logits/kernel": np.array([False] + [True] * 9)})
    with pytest.raises(ValueError, match="nope/kernel"):
        apply_structured(model, {"nope/kernel": np.ones(3, bool)})
    np.testing.assert_array_equal(before, model.get_layer("fc1").kernel.numpy())  # refused: untouched


# ---------------------------------------------------------------------------------- round_to
@pytest.mark.parametrize("width, kept, n, expected", [
    (16, 8, 8, 8),      # already a multiple
    (24, 12, 8, 16),    # halfway between 8 and 16: the larger (fewer pruned)
    (24, 11, 8, 8),     # nearer 8
    (20, 19, 8, 20),    # nearer the whole width than 16: left whole (never above the width)
    (20, 10, 8, 8),
    (64, 1, 16, 16),    # never zero: at least one block
    (4, 2, 8, 4),       # narrower than one block: kept whole
    (300, 150, 16, 144),
    (37, 5, 1, 5),      # round_to 1: unchanged
])
def test_rounded_keep_rules(width, kept, n, expected):
    from lottery.prune.channel_masks import rounded_keep

    got = rounded_keep(width, kept, n)
    assert got == expected
    assert 1 <= got <= width and (got % n == 0 or got == width)


def test_rounded_keep_refuses_bad_values():
    from lottery.prune.channel_masks import rounded_keep

    with pytest.raises(ValueError, match="round_to"):
        rounded_keep(16, 8, 0)
    with pytest.raises(ValueError, match="kept"):
        rounded_keep(16, 0, 8)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_round_to_keeps_multiples_and_records_it(scope):
    model = build_model("resnet20", 10, 8, width=12)   # stage widths 12, 24, 48
    plain = select_channels(model, "l1", 0.5, scope=scope)
    rounded = select_channels(model, "l1", 0.5, scope=scope, round_to=8)
    assert plain.meta["round_to"] == 1 and rounded.meta["round_to"] == 8
    changed = 0
    for p, r in zip(plain.meta["groups"], rounded.meta["groups"]):
        assert p["id"] == r["id"]
        if not r["prunable"]:
            assert r["kept"] == r["width"]
            continue
        assert 1 <= r["kept"] <= r["width"]
        assert r["kept"] % 8 == 0 or r["kept"] == r["width"]
        changed += p["kept"] != r["kept"]
    assert changed   # 6 of 12 channels is not a multiple of 8: rounding did something
    # The rounded mask keeps the highest-scoring channels and the plain ones are a subset or superset.
    for key in plain:
        if key in rounded and key.endswith("_bn1/gamma"):
            p, r = plain[key], rounded[key]
            assert np.all(p <= r) or np.all(r <= p)
    # The mask is an exact channel mask: it applies, and the group sizes show in the entries.
    g = {x["id"]: x for x in rounded.meta["groups"]}
    assert int(rounded["s1b1_bn1/gamma"].sum()) == g["s1b1_conv1"]["kept"]
    apply_structured(build_model("resnet20", 10, 8, width=12), rounded)


def test_round_to_one_is_the_default_and_bad_values_are_named():
    model = build_model("lenet_300_100", 10, 4)
    a, b = select_channels(model, "l2", 0.3), select_channels(model, "l2", 0.3, round_to=1)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a) and a.meta == b.meta
    rounded = select_channels(model, "l2", 0.3, round_to=16)
    kept = {g["id"]: g["kept"] for g in rounded.meta["groups"]}
    assert kept["fc1"] == 208 and kept["fc2"] == 64    # 210 -> 208, 70 -> 64
    assert int(rounded["fc1/bias"].sum()) == 208
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="round_to"):
            select_channels(model, "l2", 0.3, round_to=bad)
