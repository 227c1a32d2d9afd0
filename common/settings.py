"""Validated, frozen settings and the identity that names a run's directory.

Every stage declares one frozen dataclass of settings with `settings_dataclass`. Construction
validates (pydantic raises a ValueError subclass naming the field), unknown keys are errors, each
field's help is its `pydantic.Field(description=...)` (common.cli turns fields into flags), and
`identity_hash` gives the stable name of the directory a stage writes.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import pydantic
import yaml

SCHEMA_VERSION = 1

T = TypeVar("T")


def settings_dataclass(cls: type[T]) -> type[T]:
    """Decorator: a frozen pydantic dataclass that forbids unknown fields."""
    return pydantic.dataclasses.dataclass(
        frozen=True, config=pydantic.ConfigDict(extra="forbid", validate_default=True)
    )(cls)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a settings field appears on the command line when not as `--field-name`; put it in the
    field's type: `train_shards: Annotated[int, Flag("--shards")] = pydantic.Field(...)`."""
    name: str | None = None        # the flag, e.g. "--shards"
    metavar: str | None = None     # the placeholder in --help, e.g. DIR
    enabled: bool = True           # False: a setting of config files only, with no flag


CONFIG_ONLY = Flag(enabled=False)


class SettingsError(ValueError):
    """Settings that do not validate; the message names the offending field(s).

    `problems`: (location, message) pairs, the location a tuple starting with the field name
    (empty for a check across fields, whose message names the fields itself).
    """

    def __init__(self, message: str, problems: Iterable[tuple[tuple, str]] = ()):
        super().__init__(message)
        self.problems = tuple(problems)


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """"; did you mean 'x'?" naming the known name nearest to a mistyped `word`, or ""."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def flag_aliases(cls: type) -> dict[str, str]:
    """Key spelled as its flag -> field, for fields whose flag is not `--field-name`
    (`shards` -> `train_shards` for `--shards`): what a config-file writer may type."""
    out = {}
    for field, info in cls.__pydantic_fields__.items():
        for meta in info.metadata:
            if isinstance(meta, Flag) and meta.name:
                out[meta.name.removeprefix("--").replace("-", "_")] = field
    return out


def _unknown_key(cls: type, key: str) -> str:
    fields = list(cls.__pydantic_fields__)
    aliases = flag_aliases(cls)
    if key in aliases:
        flag = "--" + key.replace("_", "-")
        return f"unknown setting; did you mean {aliases[key]!r} (the key of {flag})?"
    close = difflib.get_close_matches(key, fields + list(aliases), n=1, cutoff=0.6)
    return "unknown setting" + (f"; did you mean {aliases.get(close[0], close[0])!r}?"
                                if close else "")


def _problem(cls: type, error: Mapping[str, Any]) -> tuple[tuple, str]:
    message = error["msg"].removeprefix("Value error, ")
    loc = tuple(error["loc"])
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        message = _unknown_key(cls, str(loc[0])) if loc else "unknown setting"
    elif error["type"] == "literal_error":
        expected = error["ctx"]["expected"].replace(" or ", ", ")
        choices = [c.strip().strip("'") for c in expected.split(",")]
        message = (f"invalid choice: {error['input']!r}{did_you_mean(error['input'], choices)} "
                   f"(choose from {expected})")
    if loc:  # validators name their field themselves ("rewind: ..."): say it once
        message = message.removeprefix(f"{loc[0]}: ")
    return loc, message


def make_settings(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build settings from a mapping; errors name the field (and suggest the nearest name for
    an unknown key or choice)."""
    try:
        return cls(**dict(values))
    except pydantic.ValidationError as err:
        problems = [_problem(cls, e) for e in err.errors()]
        text = "; ".join(f"{'.'.join(map(str, loc))}: {msg}" if loc else msg
                         for loc, msg in problems)
        raise SettingsError(f"invalid settings: {text}", problems) from None
    except TypeError as err:  # unexpected keyword on older pydantic paths
        raise SettingsError(f"invalid settings: {err}") from None


def load_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON or YAML settings file into a dict (YAML via safe_load: no object tags)."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    data = yaml.safe_load(text) if p.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    if not isinstance(data, dict):
        raise SettingsError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def settings_to_dict(settings: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))


def identity_hash(settings: Any, *, neutral: Mapping[str, Any] | None = None,
                  omit: Iterable[str] = (), omit_defaults: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> str:
    """8 hex digits naming the directory a stage writes for `settings`, and the schema version.

    neutral:       field -> value hashed in its place: fields that say where inputs and outputs
                   live, not what is computed, so moving them keeps the name.
    omit:          fields left out whatever they hold (those this kind of run does not use).
    omit_defaults: field -> value; a field holding exactly that value is left out. Fields added
                   to a settings class later are omitted at their defaults, so that directories
                   named before they existed keep their names.
    extra:         identities of the inputs, e.g. {"manifest_sha256": ...} of the dataset.
    """
    values = settings_to_dict(settings)
    unknown = (set(neutral or {}) | set(omit) | set(omit_defaults or {})) - set(values)
    if unknown:
        raise ValueError(f"{type(settings).__name__} has no fields {sorted(unknown)}")
    values.update(neutral or {})
    left_out = set(omit)
    for field, value in (omit_defaults or {}).items():
        if values[field] == value:
            left_out.add(field)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "kind": type(settings).__name__,
        "settings": {k: v for k, v in values.items() if k not in left_out},
        "extra": dict(extra or {}),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:8]
