"""The install records of a model name (``<name>/.deploy-state.json``) and the version order that
anti-rollback compares with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

STATE_SCHEMA = 1


def version_key(version: str) -> tuple:
    """Ordering for anti-rollback: PEP 440 when it parses, else numeric dotted parts."""
    try:
        from packaging.version import InvalidVersion, Version

        try:
            return (1, Version(version))
        except InvalidVersion:
            pass
    except ImportError:  # pragma: no cover - packaging ships with pip
        pass
    parts = tuple(int(p) if p.isdigit() else -1 for p in version.replace("-", ".").split("."))
    return (0, parts)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelState:
    """Contents of ``.deploy-state.json`` for one model name."""

    installed: dict[str, dict[str, Any]]  # version -> {"seq", "at", "source", "signed_by", ...}
    history: list[dict[str, Any]]  # activations, oldest first: {"seq", "version", "at", "action", "health"?}
    seq: int = 0  # event counter: orders events within the same second
    highest: str | None = None  # newest version ever installed (anti-rollback survives a prune)

    @classmethod
    def empty(cls) -> ModelState:
        return cls(installed={}, history=[])

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": STATE_SCHEMA,
            "seq": self.seq,
            "highest": self.highest,
            "installed": self.installed,
            "history": self.history,
        }
