"""Reading one TOML table of a station config: typed getters that name the key, unknown keys refused.

Every error is a :class:`ConfigError` reading ``<file>: key '<dotted.key>': <what was expected>``, but
unknown keys, which read ``<file>: unknown key(s) ['<dotted.key>', ...]; expected some of [...]``
(``runtime.config.strict``, the one strict check).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .strict import refuse_unknown


class ConfigError(ValueError):
    """A station config that cannot be used; the message names the file and key."""


class Table:
    """A TOML table being read: typed getters that name the key, and unknown-key detection."""

    def __init__(self, data: Any, where: str, prefix: str) -> None:
        self.where, self.prefix = where, prefix
        if not isinstance(data, Mapping):
            raise self.error("", f"expected a table, got {type(data).__name__}")
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}" if name else self.prefix.rstrip(".")

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: key '{self.key(name)}': {message}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = dataclasses.MISSING) -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is dataclasses.MISSING:
                raise self.error(name, "missing (required)")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(_kind_name(k) for k in kinds)
            raise self.error(name, f"expected {names}, got {value!r:.80}")
        return value

    def number(
        self,
        name: str,
        default: Any = dataclasses.MISSING,
        minimum: float | None = None,
        exclusive: bool = False,
        maximum: float | None = None,
    ) -> Any:
        value = self.get(name, (int, float), default)
        if value is None or value is default:
            return value
        value = float(value)
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise self.error(name, f"expected a number {'>' if exclusive else '>='} {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"expected a number <= {maximum:g}, got {value:g}")
        return value

    def integer(
        self, name: str, default: Any = dataclasses.MISSING, minimum: int | None = None, maximum: int | None = None
    ) -> Any:
        value = self.get(name, int, default)
        if value is None or value is default:
            return value
        if minimum is not None and value < minimum:
            raise self.error(name, f"expected an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"expected an integer <= {maximum}, got {value}")
        return value

    def choice(self, name: str, choices: tuple[Any, ...], default: Any = dataclasses.MISSING) -> Any:
        kind = type(choices[0])
        value = self.get(name, kind, default)
        if value not in choices:
            raise self.error(name, f"expected one of {list(choices)}, got {value!r}")
        return value

    def table(self, name: str) -> Table:
        self.used.add(name)
        return Table(self.data.get(name, {}), self.where, f"{self.prefix}{name}.")

    def finish(self) -> None:
        """Refuse the keys no getter asked for (the table's own keys are the ones read)."""
        refuse_unknown(self.data, self.used, self.where, ConfigError, self.prefix.rstrip("."))


def config_path(base: Path, value: str) -> Path:
    """A path from a config file: ``~`` expanded, relative ones resolved against ``base`` (the file's directory)."""
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


def _kind_name(kind: type) -> str:
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        list: "an array",
        dict: "a table",
        Mapping: "a table",
        type(None): "nothing",
    }.get(kind, kind.__name__)
