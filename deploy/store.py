"""The model store on a station: ``<models_dir>/<name>/<version>/`` plus a ``current`` link.

Layout (everything a reader sees changes by one ``rename``)::

    <models_dir>/
      .deploy.lock              flock: one deploy command at a time
      .staging/                 bundles being verified (same filesystem: renames are atomic)
      .builds/                  engine builds in progress (deploy build-engine), adopted under the lock
      <name>/
        <version>/              an installed, verified bundle (never modified by deploy)
        <version> -> .v/<version>@<id>   a version replaced since (--force, a damaged copy, an engine)
        .v/<version>@<id>/      the tree of a replaced version: a new name for every replacement
        current -> <version>    relative symlink, switched with symlink-to-temp + os.replace
        .deploy-state.json      install records and activation history (atomic writes)

A tree that ``current`` (or a version link) names is never renamed or deleted in place: a
replacement is staged under a new name and the link switched, like OSTree's deployments.
Only replacing a plain ``<version>/`` tree needs a gap in which its name is free; ``current``
is pointed at the new tree for that gap. ``recover`` (every command, under the lock) finishes
or undoes what a killed command left, so any kill leaves ``current`` on a complete version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy.config import DeployError, check_component
from deploy.store_state import ModelState, now_iso, version_key
from deploy.store_trees import is_complete, relink, version_of
from runtime.bundle.store import CONTENT, CURRENT, STATE_FILE, is_version_entry, lineage
from runtime.fsio import atomic_write_json, fsync_dir

STALE_TEMP_S = 3600.0  # hidden temp dirs older than this are leftovers of a killed run
LINK_TMP = ".link-"  # a version link being placed: .link-<version>@<8 hex> -> .v/<version>@<8 hex>
# CONTENT (.v): trees of replaced versions, each named <version>@<8 hex> ('@' is never in a version)
BUILDS = ".builds"  # under models_dir: engine builds, same filesystem as the store (adopting one is a rename)
TRASH = ".trash-"  # renamed aside (no longer named by any link), deleted at once


class ModelStore:
    """Versions of every model under one ``models_dir`` (already resolved under ``--root``)."""

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)

    # ---- paths -------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.models_dir / check_component("name", name, str(self.models_dir))

    def version_dir(self, name: str, version: str) -> Path:
        return self.model_dir(name) / check_component("version", version, str(self.models_dir / name))

    def current_link(self, name: str) -> Path:
        return self.model_dir(name) / CURRENT

    def staging_dir(self) -> Path:
        return self.models_dir / ".staging"

    def prepare_staging(self) -> Path:
        """The private (0700, root's when run as root) staging directory, emptied; under the lock."""
        staging = self.staging_dir()
        if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
            staging.unlink()
        staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(staging, 0o700)
        if os.geteuid() == 0 and staging.stat().st_uid != 0:
            os.chown(staging, 0, 0)
        self.clear_staging()
        return staging

    # ---- locking -----------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout_s: float = 600.0) -> Iterator[None]:
        """Exclusive lock over the store (an Ansible run and an admin's shell never interleave)."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        path = self.models_dir / ".deploy.lock"
        with open(path, "a+") as fh:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise DeployError(
                            f"{path}: another deploy command holds the lock (waited {timeout_s:.0f} s)"
                        ) from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- queries -----------------------------------------------------------
    def names(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        """Installed versions (directories, not temp or hidden entries), in activation order where known."""
        mdir = self.model_dir(name)
        if not mdir.is_dir():
            return []
        found = [p.name for p in mdir.iterdir() if is_version_entry(p)]
        order = self.recency(name)
        return sorted(found, key=lambda v: (order.get(v, -1), v))

    def current(self, name: str) -> str | None:
        """Version ``current`` points at, or None (no link / dangling link)."""
        link = self.current_link(name)
        if not link.is_symlink():
            return None
        target = os.readlink(link).rstrip("/")
        if not (link.parent / target).is_dir():
            return None
        return version_of(target)

    def recency(self, name: str) -> dict[str, int]:
        """version -> rank of its last activation or install (higher = more recent)."""
        state = self.read_state(name)
        rank: dict[str, int] = {}
        for version, seq in [(v, r.get("seq", 0)) for v, r in state.installed.items()] + [
            (h["version"], h.get("seq", 0)) for h in state.history
        ]:
            rank[version] = max(rank.get(version, -1), seq)
        return rank

    # ---- state file ----------------------------------------------------------
    def read_state(self, name: str) -> ModelState:
        path = self.model_dir(name) / STATE_FILE
        if not path.is_file():
            return ModelState.empty()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return ModelState(
                installed=dict(data.get("installed", {})),
                history=list(data.get("history", [])),
                seq=int(data.get("seq", 0)),
                highest=data.get("highest"),
            )
        except (OSError, ValueError, AttributeError) as exc:
            raise DeployError(
                f"{path}: unreadable deploy state ({exc}); move it aside to start a fresh history"
            ) from None

    def write_state(self, name: str, state: ModelState) -> None:
        atomic_write_json(self.model_dir(name) / STATE_FILE, state.to_dict())

    def record_activation(self, name: str, version: str, action: str, **extra: Any) -> None:
        state = self.read_state(name)
        state.history.append({"seq": state.next_seq(), "version": version, "at": now_iso(), "action": action, **extra})
        state.history = state.history[-200:]
        self.write_state(name, state)

    def record_install(self, name: str, version: str, **info: Any) -> None:
        state = self.read_state(name)
        state.installed[version] = {"seq": state.next_seq(), "at": now_iso(), **info}
        if state.highest is None or version_key(version) > version_key(state.highest):
            state.highest = version
        self.write_state(name, state)

    def highest_version(self, name: str) -> str | None:
        state = self.read_state(name)
        known = [v for v in [state.highest, *state.installed, *self.versions(name)] if v]
        return max(known, key=version_key) if known else None

    def mark_last_activation(self, name: str, version: str, **fields: Any) -> None:
        state = self.read_state(name)
        for entry in reversed(state.history):
            if entry["version"] == version:
                entry.update(fields)
                break
        self.write_state(name, state)

    # ---- changes -----------------------------------------------------------
    def switch(self, name: str, version: str | None) -> None:
        """Point ``current`` at ``version`` atomically (None removes the link)."""
        link = self.current_link(name)
        if version is None:
            if link.is_symlink():
                link.unlink()
                fsync_dir(link.parent)
            return
        if not self.version_dir(name, version).is_dir():
            raise DeployError(f"{self.version_dir(name, version)}: version {version} of {name} is not installed")
        relink(link, version, f".{CURRENT}.")

    def place_version(self, name: str, version: str, staged: Path) -> None:
        """Install the verified, synced tree ``staged`` as ``version``: a new name is a rename, an
        existing one is replaced without ever touching it in place (``replace_version``)."""
        vdir = self.version_dir(name, version)
        if os.path.lexists(vdir):
            self.replace_version(name, version, staged)  # never in place: current may name it
            return
        os.rename(staged, vdir)
        fsync_dir(vdir)  # durable before current can point at it
        fsync_dir(vdir.parent)

    def replace_version(self, name: str, version: str, staged: Path) -> None:
        """Put the verified, synced tree ``staged`` (same filesystem) in as installed ``version``.

        The tree gets a new name under ``.v/``; the ``<version>`` link is switched to it. A plain
        ``<version>/`` tree (first install) is moved aside only while ``current``, if it named
        it, points at the new tree; the old tree is deleted once nothing names it.
        """
        mdir = self.model_dir(name)
        vdir = self.version_dir(name, version)
        tag = f"{version}@{uuid.uuid4().hex[:8]}"
        target = f"{CONTENT}/{tag}"
        (mdir / CONTENT).mkdir(mode=0o755, exist_ok=True)
        os.chmod(mdir / CONTENT, 0o755)
        os.rename(staged, mdir / target)
        fsync_dir(mdir / CONTENT)
        old = os.readlink(vdir) if vdir.is_symlink() else None
        if old is not None:
            relink(vdir, target, f"{LINK_TMP}{tag}.")
            _discard(mdir, old)
            return
        pending = mdir / f"{LINK_TMP}{tag}"  # recover() places it if a kill comes in the gap below
        os.symlink(target, pending)
        fsync_dir(mdir)
        hop = os.path.islink(self.current_link(name)) and os.readlink(self.current_link(name)).rstrip("/") == version
        if hop:
            relink(self.current_link(name), target, f".{CURRENT}.")
        trash = mdir / f"{TRASH}{version}-{uuid.uuid4().hex[:8]}"
        os.rename(vdir, trash)
        os.rename(pending, vdir)
        fsync_dir(mdir)
        if hop:
            relink(self.current_link(name), version, f".{CURRENT}.")
        shutil.rmtree(trash, ignore_errors=True)

    def recover(self, name: str) -> list[str]:
        """Finish or undo what a killed deploy command left in ``name``'s directory (under the lock).

        Afterwards ``current`` names a version entry whose tree is complete, every pending version
        link is placed, and no tree is left that nothing names. Returns what was done, for a warning.
        """
        mdir = self.model_dir(name)
        done: list[str] = []
        if not mdir.is_dir():
            return done
        for p in sorted(mdir.iterdir()):
            if p.is_symlink() and p.name.startswith(LINK_TMP):
                vdir = mdir / p.name[len(LINK_TMP) :].rsplit("@", 1)[0]
                if not os.path.lexists(vdir) and (mdir / os.readlink(p)).is_dir():
                    os.rename(p, vdir)
                    done.append(f"placed the version link {vdir.name} a killed replacement left pending")
                else:
                    p.unlink()
        link = self.current_link(name)
        target = os.readlink(link).rstrip("/") if link.is_symlink() else None
        if target is not None and target.startswith(f"{CONTENT}/") and (mdir / target).is_dir():
            version = version_of(target) or ""
            vdir = mdir / version
            if not os.path.lexists(vdir):
                relink(vdir, target, f"{LINK_TMP}{target.split('/', 1)[1]}.")
            elif not vdir.is_symlink():  # killed before the old tree moved aside: finish the replacement
                pending = mdir / f"{LINK_TMP}{target.split('/', 1)[1]}"
                os.symlink(target, pending)
                trash = mdir / f"{TRASH}{version}-{uuid.uuid4().hex[:8]}"
                os.rename(vdir, trash)
                os.rename(pending, vdir)
            relink(link, version, f".{CURRENT}.")
            done.append(f"current pointed at {target} (a killed replacement): now {version}")
        elif target is not None and "/" not in target and not (mdir / target).is_dir():
            # What the old code left when killed between its two renames: the tree renamed aside.
            for aside in sorted(mdir.glob(f"{TRASH}{target}-*")) + sorted(mdir.glob(f".{target}.old-*")):
                if aside.is_dir() and not aside.is_symlink() and is_complete(aside):
                    os.rename(aside, mdir / target)
                    fsync_dir(mdir)
                    done.append(f"restored {target} from {aside.name} (current was dangling)")
                    break
        named = {os.readlink(p).rstrip("/") for p in mdir.iterdir() if p.is_symlink()}
        if (mdir / CONTENT).is_dir():
            for tree in (mdir / CONTENT).iterdir():
                if f"{CONTENT}/{tree.name}" not in named:
                    _discard(mdir, f"{CONTENT}/{tree.name}")
        return done

    def lineage(self, name: str) -> list[str]:
        return lineage(self.read_state(name).history)

    def rollback_target(self, name: str) -> str | None:
        """The version below the active one in the install history, still installed and not failed; never newer."""
        current = self.current(name)
        installed = set(self.versions(name))
        state = self.read_state(name)
        failed = {h["version"] for h in state.history if h.get("health") == "failed"}
        stack = self.lineage(name)
        if not stack:
            # No history at all (a hand-made tree): the most recently used other installed version.
            others = [v for v in self.versions(name) if v != current and v not in failed]
            return others[-1] if others else None
        below = stack[: len(stack) - 1 - stack[::-1].index(current)] if current in stack else stack
        for v in reversed(below):
            if v != current and v in installed and v not in failed:
                return v
        return None

    def prune(self, name: str, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete all but the active version, ``protect`` and the ``keep`` most recently used others."""
        current = self.current(name)
        others = [v for v in self.versions(name) if v != current and v not in protect]
        doomed = others[: max(0, len(others) - keep)]
        mdir = self.model_dir(name)
        state = self.read_state(name)
        for version in doomed:
            vdir = mdir / version
            if vdir.is_symlink():
                tree = os.readlink(vdir)
                vdir.unlink()  # the name goes first; a tree nothing names is removed by recover() if killed here
                fsync_dir(mdir)
                _discard(mdir, tree)
            else:
                _discard(mdir, version)  # renamed first: a half-deleted tree is never taken for a version
            state.installed.pop(version, None)
        if doomed:
            self.write_state(name, state)
        self.clean_temp(mdir)
        return doomed

    def clean_builds(self, builds: str, max_age_s: float = STALE_TEMP_S) -> None:
        """Remove engine build trees older than ``max_age_s`` (a killed build's; a running one is younger)."""
        cutoff = time.time() - max_age_s
        directory = self.models_dir / builds
        if directory.is_dir():
            for p in directory.iterdir():
                if p.is_dir() and not p.is_symlink() and p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)

    def clear_staging(self) -> None:
        """Empty the staging area. Only called under the lock, so anything there is from a killed run."""
        staging = self.staging_dir()
        if staging.is_dir():
            for p in staging.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()

    def clean_temp(self, directory: Path, max_age_s: float = STALE_TEMP_S) -> list[Path]:
        """Remove hidden leftovers of killed runs in a model directory.

        Trash dirs and temp ``current`` links go at once (only deploy makes them, under the lock);
        other hidden dirs (a bundle rewrite by an engine build may be in progress) only when old.
        """
        removed: list[Path] = []
        if not directory.is_dir():
            return removed
        cutoff = time.time() - max_age_s
        for p in directory.iterdir():
            if p.is_symlink() and p.name.startswith(f".{CURRENT}."):
                p.unlink()
                removed.append(p)
            elif p.name.startswith(".") and p.is_dir() and not p.is_symlink() and p.name not in (".staging", CONTENT):
                if p.name.startswith(TRASH) or p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed


def _discard(mdir: Path, tree: str) -> None:
    """Delete ``mdir/tree``, which nothing names any more: renamed aside first, so a half-deleted
    tree never sits under a name that could be taken for a complete one."""
    trash = mdir / f"{TRASH}{tree.replace('/', '_')}-{uuid.uuid4().hex[:8]}"
    os.rename(mdir / tree, trash)
    shutil.rmtree(trash, ignore_errors=True)
