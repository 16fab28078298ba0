"""The one strict key check behind every ``from_dict`` and config-table reader, station and workstation.

A typo in a config key must fail loudly, never fall back to a default. Every refusal reads
``<where>: unknown key(s) ['<section.key>', ...]; expected some of [<the section's keys>]``: all the
unknown keys at once (one edit fixes them), dotted from the file's root when the caller names the
section. It lives in runtime/ because that is the lowest layer every package may import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def refuse_unknown(
    data: Mapping[str, Any],
    known: Iterable[str],
    where: str,
    error: type[Exception] = ValueError,
    section: str = "",
) -> None:
    """Raise ``error`` naming ``where`` (a file and/or section; may be empty), every key of ``data``
    not in ``known`` (as ``section.key`` when ``section`` is given) and the accepted keys."""
    known = set(known)
    unknown = sorted(set(data) - known)
    if unknown:
        names = [f"{section}.{k}" for k in unknown] if section else unknown
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}unknown key(s) {names}; expected some of {sorted(known)}")


def field_names(cls: type) -> set[str]:
    """The dataclass ``cls``'s field names: the keys its ``from_dict`` accepts."""
    return set(getattr(cls, "__dataclass_fields__", {}))


__all__ = ["field_names", "refuse_unknown"]
