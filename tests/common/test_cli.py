"""common.cli: flags made from settings fields, one precedence rule, one usage-error format."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import pydantic
import pytest

from common.cli import EXIT_USAGE, SettingsFlags, UsageError, parse_key_values, usage_error
from common.settings import CONFIG_ONLY, Flag, settings_dataclass

REPO = Path(__file__).resolve().parents[2]


@settings_dataclass
class Example:
    data: Annotated[str, Flag(metavar="DIR")] = pydantic.Field(description="where the data is")
    epochs: int = pydantic.Field(default=3, ge=1, description="passes over the data")
    kind: Literal["a", "b"] = pydantic.Field(default="a", description="which kind")
    fast: bool = pydantic.Field(default=False, description="go fast")
    sizes: tuple[int, ...] = pydantic.Field(default=(1, 2), description="sizes")
    names: tuple[Literal["x", "y"], ...] = pydantic.Field(default=(), description="names")
    options: Annotated[dict[str, Any], Flag("--option")] = pydantic.Field(
        default_factory=dict, description="KEY=VALUE, repeatable")
    low: Optional[float] = pydantic.Field(default=None, description="a lower bound")
    high: Optional[float] = pydantic.Field(default=None, description="an upper bound")
    hidden: Annotated[int, CONFIG_ONLY] = 0


FLAGS = SettingsFlags(Example, exclusive=[("low", "high")], groups={"speed": ("fast",)})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    parser.add_argument("--config")
    FLAGS.add_arguments(parser)
    return parser


def _resolve(*argv: str):
    return FLAGS.resolve(_parser().parse_args(list(argv)))


def test_every_field_is_a_flag_with_its_type_help_and_default():
    parser = _parser()
    flags = {o: a for a in parser._actions for o in a.option_strings}
    assert {"--data", "--epochs", "--kind", "--fast", "--no-fast", "--sizes", "--names", "--option",
            "--low", "--high"} <= set(flags)
    assert "--hidden" not in flags  # config files only
    assert flags["--data"].metavar == "DIR" and flags["--kind"].metavar == "{a,b}"
    assert flags["--epochs"].help == "passes over the data (default: 3)"
    assert flags["--fast"].help == "go fast (default: --no-fast)"
    assert flags["--sizes"].help == "sizes (default: 1,2)"
    assert flags["--data"].help == "where the data is"  # required: no default shown
    assert [g.title for g in parser._action_groups][-1] == "speed"
    s = _resolve("--data", "d", "--epochs", "5", "--kind", "b", "--fast", "--sizes", "3, 4",
                 "--names", "x,y", "--option", "alpha=0.5", "--option", "name=n", "--low", "0.1")
    assert (s.data, s.epochs, s.kind, s.fast, s.sizes, s.names) == ("d", 5, "b", True, (3, 4), ("x", "y"))
    assert s.options == {"alpha": 0.5, "name": "n"} and s.low == 0.1 and s.high is None


def test_config_file_then_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: from-file\nepochs: 7\noptions: {a: 1, b: 2}\nhigh: 0.9\nhidden: 4\n")
    s = _resolve("--config", str(config), "--epochs", "8", "--option", "b=3")
    assert (s.data, s.epochs, s.hidden, s.high) == ("from-file", 8, 4, 0.9)
    assert s.options == {"a": 1, "b": 3}  # a mapping flag merges over the file's mapping
    # one of an exclusive pair given as a flag replaces the file's other one
    s = _resolve("--config", str(config), "--low", "0.2")
    assert (s.low, s.high) == (0.2, None)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--low", "1", "--high", "2"])


def test_preset_then_config_then_flags(tmp_path):
    from common.presets import preset
    from lottery.grid.settings import GridSettings

    flags = SettingsFlags(GridSettings, preset_stage="grid")
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset")
    parser.add_argument("--config")
    flags.add_arguments(parser)
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"channel_ratios": [0.4], "seed": 3}))
    name = "early-bird-resnet20"
    s = flags.resolve(parser.parse_args(["--preset", name, "--config", str(config), "--seed", "4"]))
    assert s.draw == tuple(preset(name, "grid")["draw"])  # from the preset only
    assert s.channel_ratios == (0.4,) and s.seed == 4      # the file over the preset, flags last
    with pytest.raises(UsageError, match="^--preset: unknown preset 'nope'"):
        flags.resolve(parser.parse_args(["--preset", "nope"]))


def test_errors_name_the_flag_typed_or_the_file(tmp_path):
    with pytest.raises(UsageError, match=r"^--epochs: Input should be greater than or equal to 1$"):
        _resolve("--data", "d", "--epochs", "0")
    with pytest.raises(UsageError, match=r"^--kind: invalid choice: 'c' \(choose from 'a', 'b'\)$"):
        _resolve("--data", "d", "--kind", "c")
    with pytest.raises(UsageError, match=r"^--names: invalid choice: 'z'"):
        _resolve("--data", "d", "--names", "x,z")
    config = tmp_path / "c.yaml"
    config.write_text("data: d\nepochs: 0\ncolour: red\n")
    with pytest.raises(UsageError) as err:
        _resolve("--config", str(config))
    assert f"epochs in {config}: Input should be" in str(err.value)
    assert f"colour in {config}: unknown setting" in str(err.value)
    with pytest.raises(UsageError, match=r"^--data is required \(or set 'data' in --config\)$"):
        _resolve("--epochs", "2")
    with pytest.raises(UsageError, match="^--config: .*missing.yaml"):
        _resolve("--config", str(tmp_path / "missing.yaml"))


def test_list_and_key_value_syntax_errors_are_argparse_usage_errors(capsys):
    for argv in (["--sizes", "1,two"], ["--option", "novalue"]):
        with pytest.raises(SystemExit) as exit_:
            _parser().parse_args(["--data", "d", *argv])
        assert exit_.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "example: error: argument --sizes: expected integers, got '1,two'" in err
    assert "example: error: argument --option: expected KEY=VALUE, got 'novalue'" in err


def test_parse_key_values_types_values_and_names_the_flag():
    assert parse_key_values(["alpha=0.35", "blocks=2", "name=x", "on=true"], "--model-option") == {
        "alpha": 0.35, "blocks": 2, "name": "x", "on": True}
    with pytest.raises(ValueError, match="^--model-option: expected KEY=VALUE, got '=3'"):
        parse_key_values(["=3"], "--model-option")


def test_usage_error_prints_the_command_and_returns_2(capsys):
    args = _parser().parse_args(["--data", "d"])
    assert usage_error(args, "something is wrong") == 2
    assert capsys.readouterr().err == "example: error: something is wrong\n"


def _bigticket(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigticket", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv, prog, message", [
    (["etl", "prepare", "--source", "tape", "--out", "x"], "bigticket etl prepare",
     "--source: invalid choice: 'tape'"),
    (["etl", "prepare", "--out", "x"], "bigticket etl prepare", "--source is required"),
    (["train", "dense", "--data", "d", "--model", "resnet20", "--epochs", "0"],
     "bigticket train dense", "--epochs: Input should be greater than or equal to 1"),
    (["lottery", "plan", "--run", "r", "--sparsities", "0.5", "--scope", "net"],
     "bigticket lottery plan", "--scope: invalid choice: 'net'"),
    (["lottery", "vae-study", "--data", "d", "--ratios", "1.5"], "bigticket lottery vae-study",
     "--ratios: 1.5 must lie in [0, 1)"),
    (["lottery", "vae-study", "--data", "{tmp}/nowhere"], "bigticket lottery vae-study",
     "nowhere: dataset directory does not exist"),
    (["lottery", "status", "--grid", "{tmp}/nothing"], "bigticket lottery status", "nothing"),
    (["report", "{tmp}/nothing"], "bigticket report", "nothing"),
])
def test_every_command_reports_usage_errors_alike_with_status_2(tmp_path, argv, prog, message):
    done = _bigticket(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert done.returncode == EXIT_USAGE, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and message.replace("{tmp}", str(tmp_path)) in last


def test_help_and_settings_commands_do_not_import_tensorflow():
    code = """
import sys
from bigticket.cli import STAGES, build_parser
parser = build_parser(STAGES)
args = parser.parse_args(["lottery", "plan", "--run", "r", "--sparsities", "0.5"])
args._stage_module.PLAN_FLAGS.resolve(args)
args = parser.parse_args(["etl", "prepare", "--source", "digits", "--out", "o"])
args._stage_module.settings_from_args(args)
print(sorted(m for m in ("tensorflow", "keras", "pyspark", "mpi4py", "matplotlib") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[]"]
