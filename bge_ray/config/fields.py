"""Config fields: their meaning next to their definition (``knob``), how ``--help`` and docs/config.md
show them (``field_docs``), and how a YAML or command-line value becomes a field's type (``coerce``).

Works for any config dataclass (``FinetuneConfig``, ``MineConfig``, ``ScoreConfig``, ``TuneSettings``):
a class may name the flags it accepts without effect (``IGNORED``, flag -> reason) and the first
field of each help section (``SECTIONS``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from bge_ray.errors import ConfigError


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
         shown: str | None = None) -> Any:
    """A config field with its meaning (printed by ``--help`` and docs/config.md) next to its definition.

    ``shown`` replaces the default in help text where the raw value would mislead (None meaning "the
    model's own")."""
    if not help:
        raise ValueError("every config field needs its help text")
    metadata = {"help": help, "shown": shown}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class FieldDoc:
    """One config field as ``--help`` and docs/config.md show it."""

    section: str
    name: str
    kind: str
    default: str
    help: str


def kind_name(hint: Any) -> str:
    base = base_type(hint)
    origin = typing.get_origin(base)
    if origin is list:
        return "list"
    if origin is dict:
        return "mapping"
    return getattr(base, "__name__", str(base))


def _shown_default(f: dataclasses.Field) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def field_docs(cls: type) -> list[FieldDoc]:
    """Every field of a config class with its section, type, default and meaning, in definition order."""
    hints, sections = field_hints(cls), getattr(cls, "SECTIONS", {})
    docs, section = [], ""
    for f in dataclasses.fields(cls):
        section = sections.get(f.name, section)
        docs.append(FieldDoc(section, f.name, kind_name(hints[f.name]), _shown_default(f), f.metadata.get("help", "")))
    return docs


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """Field name -> type hint for a config dataclass (class-level constants excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def ignored_flags(cls: type) -> dict[str, str]:
    """Flags a config class accepts for compatibility and ignores (``IGNORED`` on the class)."""
    return getattr(cls, "IGNORED", {})


def is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def base_type(hint: Any) -> Any:
    """Strip Optional[...] / ``X | None`` from a type hint."""
    if is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def unknown_key_error(key: str, where: str, cls: type) -> ConfigError:
    """The error for a key ``cls`` does not have, naming the closest real one."""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    command = getattr(cls, "COMMAND", "train")
    hint = f"; did you mean '{close[0]}'?" if close else f"; run `bge-ray {command} --help` for the list"
    return ConfigError(f"unknown config key '{key}' ({where}){hint}")


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def coerce(name: str, value: Any, cls: type) -> Any:
    """Convert ``value`` (from YAML or the command line) to the type of field ``name`` of ``cls``."""
    hint = field_hints(cls)[name]
    optional = is_union(hint) and type(None) in typing.get_args(hint)
    base = base_type(hint)
    if optional and base is bool and isinstance(value, str) and value.strip().lower() == "auto":
        return None  # decided later (use_gpu: auto)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty")
    want = getattr(base, "__name__", str(base))
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                want = "a finite number"
                raise ValueError
            return number
        if base is str:
            if isinstance(value, (dict, list, bool)):
                raise ValueError
            return str(value)
        if typing.get_origin(base) is list:
            item = (typing.get_args(base) or (str,))[0]
            want = {int: "a list of whole numbers", float: "a list of numbers"}.get(item, "a list of strings")
            items = [value] if isinstance(value, (str, int, float)) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError
            if item is str:
                if not all(isinstance(v, str) for v in items):
                    raise ValueError
                return list(items)
            return [_number(v, item) for v in items]
        if typing.get_origin(base) is dict:
            want = "a mapping such as {\"CPU\": 2, \"GPU\": 1}"
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value.values()
            ):
                raise ValueError
            return {str(k): float(v) for k, v in value.items()}
    except (ValueError, TypeError, OverflowError, json.JSONDecodeError):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ConfigError(f"{name} must be {want}, got {shown}") from None
    raise ConfigError(f"{name}: unsupported field type {hint}")


def _number(value: Any, kind: type) -> int | float:
    """One item of a list of numbers, from YAML or the command line; ValueError where it is not one."""
    if isinstance(value, bool):
        raise ValueError
    number = float(value)
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise ValueError
    return int(number) if kind is int else number


def check_format(name: str, fmt: str) -> None:
    """An instruction format must hold exactly two ``{}`` slots: instruction, then text."""
    try:
        fmt.format("INSTRUCTION", "TEXT")
    except (IndexError, KeyError, ValueError):
        raise ConfigError(f"{name} must be a format string with two {{}} slots (instruction, text), got {fmt!r}") from None
    if fmt.count("{}") != 2:
        raise ConfigError(f"{name} must contain exactly two {{}} slots (instruction, text), got {fmt!r}")


