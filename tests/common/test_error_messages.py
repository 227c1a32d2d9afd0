"""Error messages name what the user typed (a flag, or a key and its file), once, and suggest the
nearest valid name for an unknown key, model or choice; every stage alike."""
from __future__ import annotations

import argparse
import re

import pytest

from bigticket.cli import main
from common.cli import SettingsFlags, UsageError, usage_error
from etl.cli import FLAGS as ETL_FLAGS
from train.cli import FLAGS as DENSE_FLAGS


def _parse(flags: SettingsFlags, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cmd")
    parser.add_argument("--config")
    parser.add_argument("--preset")
    flags.add_arguments(parser)
    return parser.parse_args(list(argv))


def _message(flags: SettingsFlags, *argv: str) -> str:
    with pytest.raises(UsageError) as err:
        flags.resolve(_parse(flags, *argv))
    return str(err.value)


def test_unknown_config_key_suggests_the_real_key(tmp_path):
    config = tmp_path / "etl.yaml"
    config.write_text("val_ground_truth: labels.txt\n")   # the flag's name, not the key
    message = _message(ETL_FLAGS, "--source", "imagenet-folder", "--input", "x", "--out", "o",
                       "--config", str(config))
    assert message == (f"val_ground_truth in {config}: unknown setting; did you mean "
                       f"'val_ground_truth_file' (the key of --val-ground-truth)?")
    config.write_text("modle: resnet20\n")
    message = _message(DENSE_FLAGS, "--data", "d", "--model", "resnet20", "--config", str(config))
    assert message == f"modle in {config}: unknown setting; did you mean 'model'?"


def test_model_typo_suggests_the_model_and_names_the_flag_once():
    message = _message(DENSE_FLAGS, "--data", "d", "--model", "resnet2")
    assert message.startswith("--model: unknown model 'resnet2'; did you mean 'resnet20'? "
                              "(known models: ")
    assert message.count("model:") == 1   # was "--model: model: unknown model"
    message = _message(DENSE_FLAGS, "--data", "d", "--model", "resnet20", "--model-option", "widht=2")
    assert message.startswith("--model-option: ['widht'] not accepted by model 'resnet20'; "
                              "did you mean 'width'?")


@pytest.mark.parametrize("argv, expected", [
    (["--rewind", "banana"], "--rewind: 'banana' is not a rewind point (write e.g. 0ep, 3ep or 500it)"),
    (["--engine", "lcoal"], "--engine: invalid choice: 'lcoal'; did you mean 'local'? "
                            "(choose from 'elephas', 'local', 'multiworker')"),
    (["--stop-at-early-bird"], "--stop-at-early-bird: needs --early-bird (the detector) on"),
    (["--workers", "3"], "--workers/--averaging: only the elephas engine takes them "
                         "(engine is 'local')"),
    (["--lr-schedule", "step"], "--lr-decay-epochs: the step schedule needs at least one epoch"),
    (["--preset", "early-bird-resnet21"], "--preset: unknown preset 'early-bird-resnet21'; did you "
                                          "mean 'early-bird-resnet20'?"),
])
def test_each_field_is_named_once_as_the_flag_typed(argv, expected):
    message = _message(DENSE_FLAGS, "--data", "d", "--model", "resnet20", *argv)
    assert message.startswith(expected)
    flag = expected.split(":")[0]
    assert not re.search(rf"{flag}: [a-z_]+: ", message)


def test_a_value_from_a_config_file_is_named_by_key_and_file(tmp_path):
    config = tmp_path / "dense.yaml"
    config.write_text("rewind: banana\nengine: lcoal\n")
    message = _message(DENSE_FLAGS, "--data", "d", "--model", "resnet20", "--config", str(config))
    assert f"rewind in {config}: 'banana' is not a rewind point" in message
    assert f"engine in {config}: invalid choice: 'lcoal'; did you mean 'local'?" in message


def test_checks_after_the_settings_name_the_flag_not_the_field(tmp_path, capsys):
    """A later check's message ("val_ground_truth_file: required ...") printed by usage_error
    names the flag the user would type (or the key and file the value came from)."""
    args = _parse(ETL_FLAGS, "--source", "imagenet-folder", "--input", "x", "--out", "o")
    ETL_FLAGS.resolve(args)
    usage_error(args, ValueError("val_ground_truth_file: required for a flat validation layout"))
    assert capsys.readouterr().err == ("cmd: error: --val-ground-truth: required for a flat "
                                       "validation layout\n")
    usage_error(args, ValueError("input: --input is required for source 'urls'"))
    assert capsys.readouterr().err == "cmd: error: --input is required for source 'urls'\n"
    config = tmp_path / "etl.yaml"
    config.write_text("val_ground_truth_file: gt.txt\n")
    args = _parse(ETL_FLAGS, "--source", "imagenet-folder", "--input", "x", "--out", "o",
                  "--config", str(config))
    ETL_FLAGS.resolve(args)
    usage_error(args, ValueError("val_ground_truth_file: line 3 is empty"))
    assert capsys.readouterr().err == f"cmd: error: val_ground_truth_file in {config}: line 3 is empty\n"
    # a path that starts the message is left alone
    usage_error(args, ValueError("/data/x: no such file"))
    assert capsys.readouterr().err == "cmd: error: /data/x: no such file\n"


def test_data_that_is_a_file_is_named_as_a_file(tmp_path, capsys):
    not_a_dir = tmp_path / "dense.yaml"
    not_a_dir.write_text("epochs: 1\n")
    rc = main(["train", "dense", "--data", str(not_a_dir), "--model", "lenet_300_100",
               "--out", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"bigticket train dense: error: --data: {not_a_dir}: is a file, not a dataset "
                   f"directory (the directory `bigticket etl prepare --out` wrote)")
