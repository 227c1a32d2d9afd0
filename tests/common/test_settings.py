import dataclasses
import json
from typing import Literal

import pytest

from common.settings import SettingsError, identity_hash, load_settings_file, make_settings, settings_dataclass


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
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epochs = 3  # type: ignore[misc]


def test_hash_is_stable_and_sensitive():
    a = make_settings(Example, {"epochs": 2})
    # Pinned: a change here means every existing run directory would be renamed.
    assert identity_hash(a) == "b549602c"
    assert identity_hash(a) == identity_hash(make_settings(Example, {"epochs": 2, "lr": 0.1}))
    assert identity_hash(a) != identity_hash(make_settings(Example, {"epochs": 3}))


@settings_dataclass
class Older:
    epochs: int
    lr: float = 0.1


def test_hash_omits_a_later_field_only_at_the_given_value():
    # A field added later, left out at its default, keeps the hash the class had without it.
    Older.__name__ = Example.__name__
    older = make_settings(Older, {"epochs": 2, "lr": 0.1})
    a = make_settings(Example, {"epochs": 2})
    assert identity_hash(a) != identity_hash(older)
    assert identity_hash(a, omit_defaults={"name": "x"}) == identity_hash(older)
    changed = make_settings(Example, {"epochs": 2, "name": "y"})
    assert identity_hash(changed, omit_defaults={"name": "x"}) != identity_hash(older)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "s.yaml").write_text("epochs: 4\nlr: 0.5\n")
    (tmp_path / "s.json").write_text(json.dumps({"epochs": 4, "lr": 0.5}))
    a = make_settings(Example, load_settings_file(tmp_path / "s.yaml"))
    b = make_settings(Example, load_settings_file(tmp_path / "s.json"))
    assert a == b
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SettingsError, match="bad.yaml"):
        load_settings_file(tmp_path / "bad.yaml")


def test_identity_hash_neutral_fields_omissions_and_inputs():
    a = make_settings(Example, {"epochs": 2, "name": "here"})
    moved = make_settings(Example, {"epochs": 2, "name": "there"})
    # A neutral field (where things live) does not change the name; its neutral value is hashed.
    assert identity_hash(a, neutral={"name": ""}) == identity_hash(moved, neutral={"name": ""})
    assert identity_hash(a, neutral={"name": ""}) == identity_hash(make_settings(Example, {"epochs": 2, "name": ""}))
    # Omitted fields are left out whatever they hold.
    assert identity_hash(a, omit=["name"]) == identity_hash(moved, omit=["name"])
    assert identity_hash(a, omit=["name"]) != identity_hash(a)
    # The identities of the inputs are part of the name.
    assert identity_hash(a, extra={"manifest_sha256": "ab"}) != identity_hash(a, extra={"manifest_sha256": "cd"})
    with pytest.raises(ValueError, match="no fields"):
        identity_hash(a, neutral={"nmae": ""})


def test_literal_errors_read_like_a_choice():
    @settings_dataclass
    class Choice:
        kind: Literal["a", "b"] = "a"

    with pytest.raises(SettingsError, match=r"^invalid settings: kind: invalid choice: 'c' \(choose from 'a', 'b'\)$"):
        make_settings(Choice, {"kind": "c"})
