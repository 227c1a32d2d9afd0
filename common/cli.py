"""Command-line flags made from a settings dataclass, and the one way every command turns a preset,
a config file and flags into settings.

Each field of a settings class (common.settings.settings_dataclass) is one flag:
- name:    `--field-name`, unless its type carries a `common.settings.Flag` naming another (or none);
- help:    the field's `description`, followed by its default;
- choices: the values of a `Literal` type, listed in --help and checked by the settings class like
           every other value, so a bad choice is reported like any other bad value;
- form:    a bool is `--x/--no-x`; a tuple a comma-separated list; a dict a repeatable KEY=VALUE,
           merged over the mapping the preset or config file gave.

Precedence: the preset (`--preset NAME`, common.presets), then the config file (`--config FILE`),
then the flags, each overriding the last. A usage error prints `<command>: error: <message>`, as
argparse does for its own, and the command exits with status 2. A bad value is named once, by where
it came from: the flag typed (`--rewind: ...`), or the key and the config file or preset
(`rewind in dense.yaml: ...`); a field a later check names (`data: ...`) is shown the same way, and
an unknown key or choice gets the nearest valid name (`did you mean ...?`).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, Union

import yaml

from common.presets import preset
from common.settings import Flag, SettingsError, load_settings_file, make_settings

EXIT_USAGE = 2
EXIT_FAILURE = 1
_FROM_FLAG = object()  # origin of a value typed on the command line
# "field: ..." or "field/other: ...", how settings and later checks name what is at fault
_FIELD_PREFIX = re.compile(r"^([a-z][a-z0-9_]*(?:/[a-z][a-z0-9_]*)*): ")
# a field's name inside a message ("needs early_bird on"), after a space or parenthesis only
_FIELD_WORD = re.compile(r"(?<=[\s(])([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?![\w/-]|\.\w)")


class UsageError(ValueError):
    """A command line that cannot run; the message names the flag, file or setting at fault."""


def remember_prog(parser: argparse.ArgumentParser) -> None:
    """Record the command's name (e.g. `bigticket lottery plan`) for usage_error."""
    parser.set_defaults(_prog=parser.prog)


def usage_error(args: argparse.Namespace, err: object) -> int:
    """Print `<command>: error: <err>` to stderr; returns the exit status of a usage error."""
    return report_error(args, err, EXIT_USAGE)


def report_error(args: argparse.Namespace, err: object, status: int = EXIT_FAILURE) -> int:
    """Print `<command>: error: <err>` to stderr, a settings field at its start named as the user
    gave it (flag, or key and file); returns `status`."""
    prog = getattr(args, "_prog", None) or "bigticket"
    text = str(err)
    flags = getattr(args, "_settings_flags", None)
    if flags is not None and not isinstance(err, UsageError):  # UsageError: named already
        text = flags.name_fields(text, getattr(args, "_setting_origins", None) or {})
    print(f"{prog}: error: {text}", file=sys.stderr)
    return status


def _key_value(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {item!r}")
    try:
        return key.strip(), yaml.safe_load(value)  # typed: 0.35 -> float, 2 -> int
    except yaml.YAMLError:
        raise ValueError(f"{item!r}: the value is not a YAML scalar, list or mapping") from None


def parse_key_values(items: Iterable[str], flag: str) -> dict[str, Any]:
    """['alpha=0.35', 'name=x'] -> {'alpha': 0.35, 'name': 'x'}; ValueError names `flag`."""
    out = {}
    for item in items:
        try:
            key, value = _key_value(item)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
        out[key] = value
    return out


def _argparse_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """`parse` for argparse: its ValueError message becomes argparse's own error for the flag."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


def _list_of(item_type: Any) -> Callable[[str], list]:
    kind = {int: "integers", float: "numbers"}.get(item_type)

    def parse(text: str) -> list:
        items = [v.strip() for v in text.split(",") if v.strip()]
        if kind is None:  # strings and choices: the settings class checks them
            return items
        try:
            return [item_type(v) for v in items]
        except ValueError:
            raise ValueError(f"expected {kind}, got {text!r}") from None

    return parse


def _without_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _choices(tp: Any) -> str:
    return "{" + ",".join(map(str, typing.get_args(tp))) + "}"


def _default_text(value: Any, flag: str) -> str | None:
    if value is None or value == () or value == {}:
        return None
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


@dataclasses.dataclass(frozen=True)
class _Option:
    field: str
    flag: str
    form: str                   # "value", "bool", "list" or "mapping"
    type: Callable | None
    metavar: str | None
    help: str

    @classmethod
    def of(cls, field: str, info: Any) -> "_Option | None":
        meta = next((m for m in info.metadata if isinstance(m, Flag)), Flag())
        if not meta.enabled:
            return None
        flag = meta.name or "--" + field.replace("_", "-")
        tp = _without_none(info.annotation)
        origin = typing.get_origin(tp)
        form, convert, metavar = "value", None, None
        if tp is bool:
            form = "bool"
        elif origin is Literal:
            metavar = _choices(tp)
        elif origin is tuple:
            item = typing.get_args(tp)[0]
            form, convert = "list", _argparse_type(_list_of(item), "list")
            metavar = _choices(item) + "[,...]" if typing.get_origin(item) is Literal else "LIST"
        elif origin is dict:
            form, convert, metavar = "mapping", _argparse_type(_key_value, "KEY=VALUE"), "KEY=VALUE"
        elif tp in (int, float):
            convert = tp
        if form == "value" and metavar is None:  # the flag's name, also where it names a field
            metavar = flag.removeprefix("--").upper().replace("-", "_")
        help_text = (info.description or "").replace("%", "%%")
        default = None if info.is_required() else _default_text(
            info.get_default(call_default_factory=True), flag)
        if default is not None and "default" not in help_text.lower():
            help_text = f"{help_text} (default: {default})".strip()
        return cls(field, flag, form, convert, meta.metavar or metavar, help_text)

    def add_to(self, parser: Any) -> None:
        # default None: a flag not given leaves the value of the preset, config file or class
        kwargs: dict[str, Any] = {"dest": self.field, "default": None, "help": self.help}
        if self.form == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=self.type, metavar=self.metavar)
            if self.form == "mapping":
                kwargs["action"] = "append"
        parser.add_argument(self.flag, **kwargs)


class SettingsFlags:
    """The flags of one settings class: added to a parser, then resolved into settings.

    groups:       help section title -> fields listed under it (the others come first);
    exclusive:    sets of fields of which one flag at most may be given; a flag given replaces
                  the others' values from the preset or config file;
    preset_stage: the stage of common.presets `--preset NAME` reads (None: no presets).
    """

    def __init__(self, cls: type, *, groups: Mapping[str, Sequence[str]] | None = None,
                 exclusive: Sequence[Sequence[str]] = (), preset_stage: str | None = None):
        self.cls = cls
        self.fields = cls.__pydantic_fields__
        self.options = {f: o for f, info in self.fields.items() if (o := _Option.of(f, info))}
        self.groups = {title: tuple(fields) for title, fields in (groups or {}).items()}
        self.exclusive = tuple(tuple(group) for group in exclusive)
        self.preset_stage = preset_stage
        named = {f for fields in (*self.groups.values(), *self.exclusive) for f in fields}
        if named - set(self.options):
            raise ValueError(f"{cls.__name__}: no flags for {sorted(named - set(self.options))}")

    def flag(self, field: str) -> str:
        return self.options[field].flag if field in self.options else field

    def name_of(self, field: str, origin: Any = None) -> str:
        """How a message names `field`: its flag, or its key and the file or preset it came from
        (a field without a flag: its key)."""
        if origin is None or origin is _FROM_FLAG:
            return self.flag(field)
        return f"{field} in {origin}"

    def name_fields(self, message: str, origins: Mapping[str, Any] | None = None) -> str:
        """A message naming settings fields (`rewind: ...`, `workers/averaging: ...`, `needs
        early_bird on`) rewritten to name them as the user gave them (name_of), once."""
        origins = origins or {}
        match = _FIELD_PREFIX.match(message)
        if match and all(f in self.fields for f in match.group(1).split("/")):
            names = [self.name_of(f, origins.get(f)) for f in match.group(1).split("/")]
            rest = message[match.end():]
            prefix = "" if len(names) == 1 and rest.startswith(names[0] + " ") else (
                "/".join(names) + ": ")   # "input: --input is required ...": say it once
            message = prefix + _FIELD_WORD.sub(lambda m: self._inline(m.group(1), origins), rest)
        return message

    def _inline(self, word: str, origins: Mapping[str, Any]) -> str:
        if word not in self.fields or origins.get(word) not in (None, _FROM_FLAG):
            return word
        return self.flag(word)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        remember_prog(parser)
        parser.set_defaults(_settings_flags=self)
        title_of = {f: title for title, fields in self.groups.items() for f in fields}
        sections = {title: parser.add_argument_group(title) for title in self.groups}
        targets: dict[str, Any] = {}
        for group in self.exclusive:
            section = sections.get(title_of.get(group[0]), parser)
            together = section.add_mutually_exclusive_group()
            targets.update((f, together) for f in group)
        for field, option in self.options.items():
            option.add_to(targets.get(field) or sections.get(title_of.get(field), parser))

    def resolve(self, args: argparse.Namespace,
                fill: Callable[[dict[str, Any]], None] | None = None) -> Any:
        """Settings from the preset, the config file and the flags of `args` (in that order);
        `fill(values)` may derive defaults from the merged values. UsageError names the culprit."""
        values: dict[str, Any] = {}
        origins: dict[str, Any] = {}
        name = getattr(args, "preset", None) if self.preset_stage else None
        if name:
            try:
                self._layer(values, origins, preset(name, self.preset_stage), f"preset {name}")
            except ValueError as err:
                raise UsageError(str(err)) from None
        config = getattr(args, "config", None)
        if config:
            try:
                layer = load_settings_file(config)
            except (OSError, ValueError, yaml.YAMLError) as err:
                raise UsageError(f"--config: {err}") from None
            self._layer(values, origins, layer, str(config))
        for field, option in self.options.items():
            given = getattr(args, field, None)
            if given is None:
                continue
            for group in (g for g in self.exclusive if field in g):
                for other in set(group) - {field}:
                    values.pop(other, None)
            if option.form == "mapping":
                earlier = values.get(field)
                given = {**(earlier if isinstance(earlier, Mapping) else {}), **dict(given)}
            values[field], origins[field] = given, _FROM_FLAG
        if fill is not None:
            fill(values)
        args._setting_origins = origins  # for report_error: checks made after resolving
        for field, info in self.fields.items():
            if info.is_required() and values.get(field) in (None, ""):
                raise UsageError(f"{self.flag(field)} is required (or set {field!r} in --config)")
        try:
            return make_settings(self.cls, values)
        except SettingsError as err:
            raise UsageError(self._explain(err, origins)) from None

    @staticmethod
    def _layer(values: dict, origins: dict, layer: Mapping[str, Any], origin: Any) -> None:
        values.update(layer)
        origins.update((k, origin) for k in layer)

    def _explain(self, err: SettingsError, origins: Mapping[str, Any]) -> str:
        """The settings' own message for each problem, the field named once, as it was given."""
        if not err.problems:
            return self.name_fields(str(err), origins)
        parts = []
        for loc, message in err.problems:
            if not loc:  # a check across fields: its message starts with the field(s)
                parts.append(self.name_fields(message, origins))
                continue
            field, origin = str(loc[0]), origins.get(str(loc[0]))
            if origin is None or origin is _FROM_FLAG:
                parts.append(f"{self.flag(field)}: {message}")
            else:  # the key path as written in the file, without list positions
                key = ".".join(str(p) for p in loc if not isinstance(p, int))
                parts.append(f"{key} in {origin}: {message}")
        return "; ".join(parts)
