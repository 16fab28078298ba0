"""The station's model store as the daemon sees it: pick a bundle whose checksums pass at start.

``deploy`` (root) installs ``<models_dir>/<name>/<version>/`` and switches ``<name>/current``;
its ``.deploy-state.json`` holds the install history. After a power cut or a damaged disk,
``current`` may name a version whose files no longer verify. Like an A/B update system,
the daemon then starts on the previous version of the history instead of crash-looping,
and says why. The daemon cannot repair ``current`` (the store is root's); ``deploy status``
shows the mismatch and ``deploy install``/``rollback`` fix it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle.load import load_bundle
from runtime.bundle.manifest import BundleError

STATE_FILE = ".deploy-state.json"
CURRENT = "current"
CONTENT = ".v"  # trees of replaced versions (deploy.store.replace_version)
ROLLBACK_ACTIONS = ("rollback", "rollback-to", "auto-rollback")


def lineage(history: Iterable[dict[str, Any]]) -> list[str]:
    """The install history as a stack: installs push; any rollback truncates back to its target."""
    stack: list[str] = []
    for entry in history:
        v = entry.get("version")
        if not isinstance(v, str):
            continue
        if entry.get("action") in ROLLBACK_ACTIONS and v in stack:
            del stack[len(stack) - stack[::-1].index(v) :]
        else:
            stack.append(v)
    return stack


def read_history(model_dir: Path) -> list[dict[str, Any]]:
    """Activation history from the store's state file ([] when absent or unreadable)."""
    try:
        data = json.loads((model_dir / STATE_FILE).read_text(encoding="utf-8"))
        history = data.get("history", [])
        return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
    except (OSError, ValueError, AttributeError):
        return []


@dataclass(frozen=True)
class BootChoice:
    """The bundle to load; ``reason`` is None when the configured one verified, else what happened."""

    path: Path
    reason: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.reason is not None


def is_version_entry(p: Path) -> bool:
    """``<version>/``, or ``<version> -> .v/<version>@<id>`` for a version deploy replaced since (deploy.store)."""
    if p.name.startswith(".") or p.name == CURRENT or not p.is_dir():
        return False
    return not p.is_symlink() or os.readlink(p).startswith(f"{CONTENT}/")


def _verifies(path: Path) -> str | None:
    try:
        load_bundle(path, verify=True, check_graph=False)
        return None
    except (BundleError, OSError) as exc:
        return str(exc)


def choose_bootable(configured: str | os.PathLike[str]) -> BootChoice:
    """``configured`` if it verifies; for a store's ``current`` link, else the newest earlier version that does.

    Candidates come from the install history walked backwards (never forward), then any
    other installed version, newest first. Returns the configured path (the load then
    fails with its own error) when nothing verifies or the path is not a store link.
    """
    path = Path(configured)
    error = _verifies(path)
    if error is None or path.name != CURRENT or not path.is_symlink():
        return BootChoice(path)
    model_dir = path.parent
    current = os.readlink(path).rstrip("/")
    stack = lineage(read_history(model_dir))
    below = stack[: len(stack) - 1 - stack[::-1].index(current)] if current in stack else stack
    others = sorted(
        (p for p in model_dir.iterdir() if is_version_entry(p)),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    seen: set[str] = {current}
    for version in [*reversed(below), *(p.name for p in others)]:
        if version in seen or "/" in version:
            continue
        seen.add(version)
        candidate = model_dir / version
        if candidate.is_dir() and _verifies(candidate) is None:
            return BootChoice(
                candidate,
                f"{path} -> {current} failed verification ({error}); starting on "
                f"{version}, the previous version in the install history",
            )
    return BootChoice(path, f"{path} -> {current} failed verification ({error}) and no earlier version verifies")
