"""Validated, frozen, hashable settings.

Every stage declares one frozen dataclass of settings with `settings_dataclass`. Construction
validates (pydantic raises a ValueError subclass naming the field), unknown keys are errors, and
`settings_hash` gives the stable identity that names a run's directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

import pydantic
import yaml

SCHEMA_VERSION = 1

T = TypeVar("T")


def settings_dataclass(cls: type[T]) -> type[T]:
    """Decorator: a frozen pydantic dataclass that forbids unknown fields."""
    return pydantic.dataclasses.dataclass(
        frozen=True, config=pydantic.ConfigDict(extra="forbid", validate_default=True)
    )(cls)


class SettingsError(ValueError):
    """Settings that do not validate; the message names the offending field(s)."""


def _readable(err: pydantic.ValidationError, cls: type) -> SettingsError:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            msg = "unknown setting"
        lines.append(f"{field}: {msg}" if field else msg)
    return SettingsError(f"invalid {cls.__name__}: " + "; ".join(lines))


def make_settings(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build settings from a mapping; errors name the field."""
    try:
        return cls(**dict(values))
    except pydantic.ValidationError as err:
        raise _readable(err, cls) from None
    except TypeError as err:  # unexpected keyword on older pydantic paths
        raise SettingsError(f"invalid {cls.__name__}: {err}") from None


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


def settings_hash(settings: Any, extra: Mapping[str, Any] | None = None, *,
                  omit: Mapping[str, Any] | None = None) -> str:
    """8 hex digits identifying the fully resolved settings plus the schema version.

    `omit`: field -> value; a field holding exactly that value is left out. Fields added to a
    settings class later are omitted at their defaults, so earlier directories keep their names.
    """
    omit = dict(omit or {})
    values = {k: v for k, v in settings_to_dict(settings).items()
              if not (k in omit and v == omit[k])}
    payload = {
        "schema_version": SCHEMA_VERSION,
        "kind": type(settings).__name__,
        "settings": values,
        "extra": dict(extra or {}),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:8]
