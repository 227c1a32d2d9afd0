"""The VAE neuron-pruning study: real Keras models, the ETL's real digits dataset, the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lottery.vae import cli as vae_cli  # noqa: E402
from lottery.vae.model import build_vae, evaluate_vae, evaluation_noise, hidden_layers, train_vae  # noqa: E402
from lottery.vae.study import VaeStudySettings, compact_vae, load_pixels, neuron_keeps, study_paths  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def _tiny_vae(input_dim=16, enc=(12, 8), dec=(8, 12), latent=3, activation="relu", seed=0):
    keras.utils.set_random_seed(seed)
    vae = build_vae(input_dim, enc, dec, latent, activation=activation, seed=seed)
    # Non-zero biases, so that a pruned neuron's bias must go too for outputs to match.
    rng = np.random.default_rng(seed)
    for layer in hidden_layers(vae.encoder) + hidden_layers(vae.decoder):
        layer.bias.assign(rng.normal(0, 0.2, layer.units).astype("float32"))
    return vae


def _pixels(n=64, dim=16, seed=3):
    return np.random.default_rng(seed).uniform(0, 1, (n, dim)).astype("float32")


def _outputs(vae, x):
    mean, log_var = vae.encoder(x)
    return np.asarray(mean), np.asarray(log_var), np.asarray(vae(x))


def _masked_copy(vae, keeps):
    """The same architecture and weights with the dropped neurons' kernel columns and biases zeroed."""
    enc, dec = vae.hidden_widths
    copy = build_vae(vae.encoder.input.shape[-1], enc, dec, vae.encoder.output[0].shape[-1],
                     activation=hidden_layers(vae.encoder)[0].get_config()["activation"])
    copy.encoder.set_weights(vae.encoder.get_weights())
    copy.decoder.set_weights(vae.decoder.get_weights())
    for layer in hidden_layers(copy.encoder) + hidden_layers(copy.decoder):
        drop = ~keeps[layer.name]
        kernel, bias = layer.get_weights()
        kernel[:, drop] = 0.0
        bias[drop] = 0.0
        layer.set_weights([kernel, bias])
    return copy


# --------------------------------------------------------------------------------- model, loss
def test_loss_split_sums_to_total_and_matches_the_formulas():
    vae = _tiny_vae()
    x = _pixels()
    fit = train_vae(vae, x, epochs=2, batch_size=16, lr=1e-2)
    for epoch in fit["history"]:
        assert epoch["loss"] == pytest.approx(epoch["reconstruction"] + epoch["kl"], rel=1e-5)
        assert epoch["kl"] > 0
    result = evaluate_vae(vae, x, seed=5, batch_size=24)  # batches that do not divide 64
    assert result["total"] == pytest.approx(result["reconstruction"] + result["kl"], rel=1e-9)
    # Independently, in NumPy: BCE summed over pixels, KL to N(0, I) summed over latent units.
    mean, log_var = (np.asarray(t, np.float64) for t in vae.encoder(x))
    z = mean + np.exp(0.5 * log_var) * evaluation_noise(len(x), 3, 5)
    p = 1.0 / (1.0 + np.exp(-np.asarray(vae.decoder(z.astype("float32")), np.float64)))
    bce = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(axis=1).mean()
    kl = (-0.5 * (1 + log_var - mean ** 2 - np.exp(log_var)).sum(axis=1)).mean()
    assert result["reconstruction"] == pytest.approx(bce, rel=1e-4)
    assert result["kl"] == pytest.approx(kl, rel=1e-4)
    # Seeded noise: the same evaluation twice is the same number; another seed is not.
    assert evaluate_vae(vae, x, seed=5)["total"] == pytest.approx(result["total"], rel=1e-6)
    assert evaluate_vae(vae, x, seed=6)["total"] != pytest.approx(result["total"], rel=1e-6)


def test_vae_has_no_lambda_and_reloads_with_safe_mode(tmp_path):
    vae = _tiny_vae()
    x = _pixels(8)
    path = tmp_path / "vae.keras"
    vae.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for a, b in zip(_outputs(vae, x), _outputs(loaded, x)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert not any(isinstance(layer, keras.layers.Lambda)
                   for part in (vae.encoder, vae.decoder) for layer in part.layers)


# ---------------------------------------------------------------------------- pruning, compaction
@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm"])
def test_ratio_zero_keeps_the_original(criterion):
    vae = _tiny_vae()
    x = _pixels()
    same = compact_vae(vae, neuron_keeps(vae, criterion, 0.0))
    assert same.hidden_widths == vae.hidden_widths and same.count_params() == vae.count_params()
    for a, b in zip(_outputs(vae, x), _outputs(same, x)):
        np.testing.assert_array_equal(a, b)
    assert evaluate_vae(same, x, seed=1) | {"seconds": 0} == evaluate_vae(vae, x, seed=1) | {"seconds": 0}


@pytest.mark.parametrize("criterion,ratio,activation", [("l1", 0.5, "relu"), ("l2", 0.2, "tanh"),
                                                         ("fpgm", 0.8, "elu")])
def test_compacted_vae_equals_the_masked_original(criterion, ratio, activation):
    vae = _tiny_vae(activation=activation)
    x = _pixels()
    keeps = neuron_keeps(vae, criterion, ratio)
    assert set(keeps) == {"enc_hidden_0", "enc_hidden_1", "dec_hidden_0", "dec_hidden_1"}
    small = compact_vae(vae, keeps)
    masked = _masked_copy(vae, keeps)
    assert small.hidden_widths == (tuple(int(keeps[f"enc_hidden_{i}"].sum()) for i in range(2)),
                                   tuple(int(keeps[f"dec_hidden_{i}"].sum()) for i in range(2)))
    assert small.hidden_widths != vae.hidden_widths
    # Latent units and output pixels are never pruned.
    assert small.encoder.output[0].shape[-1] == 3 and small(x).shape == x.shape
    for got, want in zip(_outputs(small, x), _outputs(masked, x)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # ... and pruning did change the function (the comparison above is not vacuous).
    assert not np.allclose(_outputs(small, x)[2], _outputs(vae, x)[2], atol=1e-4)
    assert evaluate_vae(small, x, seed=2)["total"] == pytest.approx(
        evaluate_vae(masked, x, seed=2)["total"], rel=1e-5)
    # The original is left untouched by compaction.
    np.testing.assert_array_equal(_outputs(vae, x)[2], _outputs(_tiny_vae(activation=activation), x)[2])


def _dense_params(sizes):
    return sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))


def test_params_drop_as_the_ratio_grows():
    vae = _tiny_vae(input_dim=16, enc=(20, 10), dec=(10, 20), latent=4)
    previous = None
    for ratio in (0.0, 0.2, 0.5, 0.8):
        small = compact_vae(vae, neuron_keeps(vae, "l2", ratio))
        (e0, e1), (d0, d1) = small.hidden_widths
        assert (e0, e1, d0, d1) == tuple(n - int(np.floor(ratio * n + 0.5)) for n in (20, 10, 10, 20))
        # encoder: 16 -> e0 -> e1 -> (mean, log_var); decoder: 4 -> d0 -> d1 -> 16
        expected = _dense_params([16, e0, e1]) + 2 * _dense_params([e1, 4]) + _dense_params([4, d0, d1, 16])
        assert small.count_params() == expected
        assert previous is None or small.count_params() < previous
        previous = small.count_params()


def test_criteria_choose_different_neurons():
    vae = _tiny_vae(input_dim=4, enc=(5, 3), dec=(3, 5), latent=2)
    # Columns = neurons. l1: c1 (|.|_1 = 3) is smallest; l2: c0 (|.|_2 = 2); fpgm: c2, the centre of
    # the cluster {c2, c3, c4} and so nearest the layer's geometric median, though its norm is large.
    kernel = np.array([[1, 3, 6, 6, 6],
                       [1, 0, 6, 6, 7],
                       [1, 0, 6, 6, 6],
                       [1, 0, 6, 7, 6]], dtype="float32")
    layer = vae.encoder.get_layer("enc_hidden_0")
    layer.kernel.assign(kernel)
    dropped = {c: np.flatnonzero(~neuron_keeps(vae, c, 0.2)["enc_hidden_0"]).tolist()
               for c in ("l1", "l2", "fpgm")}
    assert dropped == {"l1": [1], "l2": [0], "fpgm": [2]}


def test_compaction_refuses_bad_keeps():
    vae = _tiny_vae()
    with pytest.raises(ValueError, match="z_mean"):
        compact_vae(vae, {"z_mean": np.ones(3, bool)})
    with pytest.raises(ValueError, match="enc_hidden_0"):
        compact_vae(vae, {"enc_hidden_0": np.zeros(12, bool)})
    with pytest.raises(ValueError, match="enc_hidden_1"):
        compact_vae(vae, {"enc_hidden_1": np.ones(5, bool)})


def test_settings_validate_and_name_the_field():
    from common.settings import SettingsError, make_settings

    s = make_settings(VaeStudySettings, {"data": "d", "hidden": "32,16", "ratios": "0,0.5"})
    assert s.hidden == (32, 16) and s.resolved_decoder_hidden == (16, 32) and s.ratios == (0.0, 0.5)
    assert [rid for _, _, rid in s.row_ids][:2] == ["l1-r0000", "l1-r5000"]
    for values, field in [({"ratios": "1.0"}, "ratios"), ({"criteria": "l1,bn"}, "criteria"),
                          ({"criteria": "l1,l1"}, "criteria"), ({"hidden": ""}, "hidden"),
                          ({"epochs": 0}, "epochs"), ({"activation": "sigmoid"}, "activation"),
                          ({"ratios": "0.5,0.50001"}, "ratios"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(SettingsError, match=field):
            make_settings(VaeStudySettings, {"data": "d", **values})


# ------------------------------------------------------------------------- digits, CLI, resume
@pytest.fixture(scope="module")
def digits8(spark, tmp_path_factory) -> Path:
    """The ETL job's digits dataset at 8x8 (one shard per split)."""
    from etl.job import prepare
    from etl.settings import EtlSettings

    out = tmp_path_factory.mktemp("vae-data") / "digits8"
    prepare(EtlSettings(source="digits", out=str(out), resize="fixed:8", format="tfrecord",
                        train_shards=1, validation_shards=1), spark=spark)
    return out


def test_load_pixels_gives_flat_grayscale_in_unit_range(digits8):
    from train.data import open_dataset

    info = open_dataset(digits8)
    x = load_pixels(info, "validation")
    assert x.shape == (info.records["validation"], 64) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5 and 0.05 < x.mean() < 0.6
    with pytest.raises(ValueError, match="max_records"):
        load_pixels(info, "train", max_records=10)


def _cli(*argv):
    return vae_cli.main([str(a) for a in argv])


def test_cli_end_to_end_resumes_and_finetuning_lowers_the_loss(digits8, tmp_path, capsys, caplog):
    flags = ["--data", digits8, "--out", tmp_path / "runs", "--hidden", "24,12", "--latent-dim", 3,
             "--epochs", 3, "--finetune-epochs", 3, "--lr", "3e-3", "--ratios", "0.5,0.8",
             "--criteria", "l1,fpgm"]
    assert _cli(*flags) == 0
    printed = capsys.readouterr().out
    paths = study_paths(vae_cli.settings_from_args(_parse(flags)))
    assert str(paths.root) in printed
    results = json.loads(paths.results_json.read_text())
    rows = results["rows"]
    assert [(r["criterion"], r["ratio"]) for r in rows] == [("l1", 0.5), ("l1", 0.8),
                                                            ("fpgm", 0.5), ("fpgm", 0.8)]
    for r in rows:
        assert f"{r['criterion']:<9} {r['ratio']:>5.2f}" in printed
        assert r["params_after"] < r["params_before"] == results["trained"]["params"]
        for stage in ("before", "pruned", "finetuned"):
            assert r[f"total_{stage}"] == pytest.approx(r[f"reconstruction_{stage}"] + r[f"kl_{stage}"])
        assert r["total_pruned"] > r["total_before"]       # removing half the neurons costs
        assert r["total_finetuned"] < r["total_pruned"]    # and fine-tuning wins some back
        assert r["train_seconds"] > 0 and r["finetune_seconds"] > 0 and r["eval_seconds_pruned"] > 0
    by = {(r["criterion"], r["ratio"]): r for r in rows}
    assert by["l1", 0.8]["params_after"] < by["l1", 0.5]["params_after"]
    csv_lines = paths.results_csv.read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("criterion,ratio,params_before")

    # A finished study re-run does nothing.
    stamps = {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()}
    caplog.clear()
    assert _cli(*flags) == 0
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()} == stamps

    # An interrupted one redoes only the missing row, on the saved trained weights.
    missing = paths.row("fpgm-r5000")
    missing.unlink()
    paths.results_json.unlink()
    assert _cli(*flags) == 0
    redone = json.loads(missing.read_text())
    for p, stamp in stamps.items():
        if p not in (missing, paths.results_json, paths.results_csv):
            assert p.stat().st_mtime_ns == stamp, p
    assert redone["total_finetuned"] == pytest.approx(by["fpgm", 0.5]["total_finetuned"], rel=1e-4)
    assert json.loads(paths.results_json.read_text())["rows"][2]["row_id"] == "fpgm-r5000"


def _parse(flags):
    import argparse

    parser = argparse.ArgumentParser()
    vae_cli.add_arguments(parser)
    return parser.parse_args([str(f) for f in flags])


@pytest.mark.parametrize("flags,named", [
    (["--ratios", "0.5,1.5"], "--ratios"),
    (["--criteria", "l1,bn"], "--criteria"),
    (["--finetune-epochs", "-1"], "--finetune-epochs"),
    (["--format", "zip"], "--format"),
    (["--hidden", "16,0"], "--hidden"),
])
def test_bad_flags_name_the_flag(flags, named, capsys, tmp_path):
    assert _cli("--data", tmp_path, *flags) == 2
    assert f"error: {named}:" in capsys.readouterr().err


def test_cli_errors_from_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "lottery.vae.cli", *map(str, argv)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)

    no_data = run("--epochs", "2")
    assert no_data.returncode == 2 and "--data" in no_data.stderr
    not_int = run("--data", tmp_path, "--epochs", "two")
    assert not_int.returncode == 2 and "--epochs" in not_int.stderr
    config = tmp_path / "study.yaml"
    config.write_text("data: x\nratios: [0.2, 2.0]\n")
    from_config = run("--config", config)
    assert from_config.returncode == 2 and f"ratios in {config}" in from_config.stderr
    not_a_dataset = run("--data", tmp_path / "nowhere")
    assert not_a_dataset.returncode == 2 and "nowhere" in not_a_dataset.stderr
