"""The store's links and trees: the version a link target names, a link switched atomically, and
whether a tree is a complete bundle (``deploy.store.ModelStore`` does the swaps with them)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from runtime.bundle.store import CONTENT
from runtime.fsio import fsync_dir


def version_of(target: str) -> str | None:
    """The version a ``current`` target names: ``<version>`` or ``.v/<version>@<id>`` (None otherwise)."""
    if "/" not in target:
        return None if target.startswith(".") else target
    head, _, tree = target.partition("/")
    if head != CONTENT or "/" in tree or "@" not in tree:
        return None
    return tree.rsplit("@", 1)[0]


def relink(link: Path, target: str, prefix: str) -> None:
    """Point the symlink ``link`` at ``target`` (relative) atomically and durably: temp link + ``os.replace``."""
    tmp = link.with_name(f"{prefix}{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp)  # relative: the tree works under any --root
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def is_complete(tree: Path) -> bool:
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import BundleError

    try:
        load_bundle(tree, verify=True, check_graph=False)
        return True
    except (BundleError, OSError):
        return False
