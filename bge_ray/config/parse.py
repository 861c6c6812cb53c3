"""From YAML files, command-line arguments and dicts to a validated config object.

``load_config`` is what the CLI and ``bge_ray.load_config`` do: read the YAML (optional), apply the
``--key value`` overrides, build the dataclass (types converted, unknown keys named), resolve
names that stand for local paths (``config.resolved()``), and validate (``config.validate()``,
pure: it reads, never changes). Nothing here touches a cluster.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from typing import Any

import yaml

from bge_ray.config.fields import base_type, coerce, field_hints, ignored_flags, unknown_key_error
from bge_ray.config.finetune import FinetuneConfig
from bge_ray.errors import ConfigError

SECTIONS = ("model", "data", "training", "validation", "scaling")  # YAML groups, flattened on load


def parse_overrides(argv: list[str], cls: type = FinetuneConfig) -> dict[str, Any]:
    """Parse ``--key value`` / ``--key=value`` / ``--flag`` / ``--list a b c`` into a dict of ``cls``'s fields."""
    hints, ignored = field_hints(cls), ignored_flags(cls)
    translator = getattr(cls, "TRANSLATE", None)
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument {tok!r}: options look like --key value or --key=value")
        key, eq, inline = tok[2:].partition("=")
        key = key.replace("-", "_")
        key = getattr(cls, "ALIASES", {}).get(key, key)
        i += 1
        if key not in hints and key not in ignored and not (translator and translator.known(key)):
            raise unknown_key_error(key, "command line", cls)
        if eq:
            values = [inline]
        else:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        if key not in hints:  # FlagEmbedding's / HF's flag: build_config decides what it does
            out[key] = True if not values else values[0] if len(values) == 1 else values
            continue
        base = base_type(hints[key])
        if typing.get_origin(base) is list:
            if len(values) == 1 and "," in values[0] and not os.path.exists(values[0]):
                values = [v for v in values[0].split(",") if v]
            out[key] = values
        elif not values:
            if base is not bool:
                raise ConfigError(f"--{key} needs a value")
            out[key] = True
        elif len(values) > 1:
            raise ConfigError(f"--{key} takes one value, got {values}")
        else:
            out[key] = values[0]
    return out


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file into a flat dict (sections ``model:``/``data:``/... are flattened)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    # "{config_dir}" in a string value is the folder of this file, so a config can ship with its data.
    base = os.path.dirname(os.path.abspath(path))
    return {k: _expand_config_dir(v, base) for k, v in flat.items()}


def _expand_config_dir(value: Any, base: str) -> Any:
    if isinstance(value, str):
        return value.replace("{config_dir}", base)
    if isinstance(value, list):
        return [_expand_config_dir(v, base) for v in value]
    return value


def build_config(values: dict[str, Any], where: str = "config", cls: type = FinetuneConfig) -> Any:
    """Build a ``cls`` from a flat dict, converting types; unknown keys are errors. Not validated."""
    hints, ignored = field_hints(cls), ignored_flags(cls)
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: a config must be a mapping of keys to values, got {type(values).__name__}")
    translator = getattr(cls, "TRANSLATE", None)
    kwargs: dict[str, Any] = {}
    aliases = getattr(cls, "ALIASES", {})
    values = {aliases.get(k, k): v for k, v in values.items()}
    for key, value in values.items():
        if isinstance(key, str) and key not in hints and translator is not None and translator.known(key):
            fields, notice = translator.translate(key, value)
            kwargs.update({k: coerce(k, v, cls) for k, v in fields.items() if k not in values})
            if notice:
                print(f"[bge-ray] {notice}", file=sys.stderr, flush=True)
            continue
        if key in ignored:
            print(f"[bge-ray] --{key} has no effect here: {ignored[key]}", file=sys.stderr, flush=True)
            continue
        if not isinstance(key, str) or key not in hints:
            raise unknown_key_error(str(key), where, cls)
        kwargs[key] = coerce(key, value, cls)
    return cls(**kwargs)


def read_config(path: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
                cls: type = FinetuneConfig) -> dict[str, Any]:
    """YAML file (optional) + command-line overrides -> the flat dict of values (not yet a config)."""
    values = load_yaml(path) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides, cls)
    values.update(overrides or {})
    return values


def load_config(path: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
                cls: type = FinetuneConfig) -> Any:
    """YAML file (optional) + command-line overrides -> a validated ``cls``.

    Raises:
        ConfigError: a missing file, an unknown key, a value of the wrong type or an impossible
            combination; the message says what to change.
    """
    return resolve_config(read_config(path, overrides, cls), cls, where=path or "config")


def resolve_config(config: Any, cls: type = FinetuneConfig, where: str = "config") -> Any:
    """A config object, a dict of fields or a YAML path -> a validated ``cls`` (a new object: the
    argument is never changed).

    Raises:
        ConfigError: as :func:`load_config`.
    """
    if isinstance(config, cls):
        cfg = dataclasses.replace(config)
    elif isinstance(config, dict):
        cfg = build_config(config, where=where, cls=cls)
    elif isinstance(config, (str, os.PathLike)):
        cfg = build_config(load_yaml(str(config)), where=str(config), cls=cls)
    else:
        raise ConfigError(f"config must be a {cls.__name__}, a dict or a YAML path, got {type(config).__name__}")
    cfg = cfg.resolved()
    cfg.validate()
    return cfg
