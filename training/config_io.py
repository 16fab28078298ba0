"""Reading configuration: one TOML/JSON file reader; the strict key check every ``from_dict`` uses is
``runtime.config.strict`` (re-exported here; pass ``ConfigError`` or the caller's own error).

A typo in a config key must fail loudly, naming the file or table and the keys it accepts, never
fall back to a default. Python 3.10 (JetPack 6) has no ``tomllib``: ``tomli`` (a base dependency
there) reads TOML instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.config.strict import field_names, refuse_unknown

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """Invalid configuration; the message names the file and key."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (any suffix but ``.json``) or JSON config file as a dict; validated later by a ``from_dict``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ConfigError(f"{path}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table/object at the top level")
    return data


def drop_when_off(d: dict[str, Any], off: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` without the keys (dotted: ``"augment.mixup"``) that hold their "off" value: options added
    after runs were made leave those runs' config hashes (and so their --resume) unchanged while off."""
    out = dict(d)
    for key, value in off.items():
        head, _, tail = key.partition(".")
        if tail:
            sub = dict(out.get(head) or {})
            if sub.get(tail) == value:
                sub.pop(tail)
            out[head] = sub
        elif out.get(head) == value:
            out.pop(head)
    return out


__all__ = ["ConfigError", "drop_when_off", "field_names", "read_config_file", "refuse_unknown"]
