import json

import pytest

from common.settings import (SettingsError, load_settings_file, make_settings,
                             settings_dataclass, settings_hash)


@settings_dataclass
class Example:
    epochs: int
    lr: float = 0.1
    name: str = "x"


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(SettingsError, match="colour: unknown setting"):
        make_settings(Example, {"epochs": 1, "colour": "red"})


def test_wrong_type_names_the_field():
    with pytest.raises(SettingsError, match="epochs"):
        make_settings(Example, {"epochs": "many"})


def test_settings_are_frozen():
    s = make_settings(Example, {"epochs": 2})
    with pytest.raises(Exception):
        s.epochs = 3  # type: ignore[misc]


def test_hash_is_stable_and_sensitive():
    a = make_settings(Example, {"epochs": 2})
    # Pinned: a change here means every existing run directory would be renamed.
    assert settings_hash(a) == "b549602c"
    assert settings_hash(a) == settings_hash(make_settings(Example, {"epochs": 2, "lr": 0.1}))
    assert settings_hash(a) != settings_hash(make_settings(Example, {"epochs": 3}))


@settings_dataclass
class Older:
    epochs: int
    lr: float = 0.1


def test_hash_omits_a_later_field_only_at_the_given_value():
    # A field added later, left out at its default, keeps the hash the class had without it.
    Older.__name__ = Example.__name__
    older = make_settings(Older, {"epochs": 2, "lr": 0.1})
    a = make_settings(Example, {"epochs": 2})
    assert settings_hash(a) != settings_hash(older)
    assert settings_hash(a, omit={"name": "x"}) == settings_hash(older)
    changed = make_settings(Example, {"epochs": 2, "name": "y"})
    assert settings_hash(changed, omit={"name": "x"}) != settings_hash(older)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "s.yaml").write_text("epochs: 4\nlr: 0.5\n")
    (tmp_path / "s.json").write_text(json.dumps({"epochs": 4, "lr": 0.5}))
    a = make_settings(Example, load_settings_file(tmp_path / "s.yaml"))
    b = make_settings(Example, load_settings_file(tmp_path / "s.json"))
    assert a == b
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SettingsError, match="bad.yaml"):
        load_settings_file(tmp_path / "bad.yaml")
