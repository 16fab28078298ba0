"""Read-only, path-confined access to a station's snapshot spool (the console's only file input).

A request names a station and a file name; the name is checked against the spool's naming
scheme (no separators, no dot-files), opened relative to the configured spool directory with
O_NOFOLLOW (a symlink planted in the spool is refused, not followed), and must be a regular
file no larger than the configured cap. Nothing outside the spool is ever opened.

RecentSnapshots keeps the files read in the last few seconds: every browser on the live view asks
for the same new snapshot (its tile and its event thumbnail), so one read serves them all, without
a thread hop or a file read each. Spool files are written once (temp + rename) and never change.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections import OrderedDict
from pathlib import Path

# runtime/serving/snapshots.py names: <UTC stamp>_<station>_<camera>_<seq>_<verdict>.jpg (+ .json sidecar)
SNAPSHOT_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,200}\.(jpg|json)$")


class SnapshotRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_name(name: str) -> str:
    if not SNAPSHOT_NAME.match(name) or ".." in name:
        raise SnapshotRefused(400, f"snapshot name {name[:80]!r}: expected a spool file name (no path)")
    return name


def read_snapshot(root: Path, name: str, max_bytes: int) -> bytes:
    """The bytes of spool file ``name`` under ``root``; SnapshotRefused (with an HTTP status) otherwise."""
    check_name(name)
    try:
        fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SnapshotRefused(404, f"snapshot {name}: not found") from None
    except OSError as exc:  # ELOOP: a symlink; EACCES, ...
        raise SnapshotRefused(403, f"snapshot {name}: refused ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotRefused(403, f"snapshot {name}: not a regular file")
        if st.st_size > max_bytes:
            raise SnapshotRefused(413, f"snapshot {name}: {st.st_size} bytes exceeds the {max_bytes}-byte cap")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew while we read it
            raise SnapshotRefused(413, f"snapshot {name}: exceeds the {max_bytes}-byte cap")
        return data
    finally:
        os.close(fd)


def read_path(path: str, max_bytes: int) -> bytes:
    """A stored ``snapshot_path`` (export): the same checks, confined to the file's own spool directory."""
    p = Path(path)
    return read_snapshot(p.parent, p.name, max_bytes)


class RecentSnapshots:
    """Bytes of recently read snapshot files, at most ``max_bytes`` in all and ``max_age_s`` old (loop thread only)."""

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, max_age_s: float = 20.0) -> None:
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self.items: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        self.size = 0

    def get(self, root: Path | str, name: str) -> bytes | None:
        key = (str(root), name)
        hit = self.items.get(key)
        if hit is None:
            return None
        if time.monotonic() - hit[1] > self.max_age_s:  # read again: the spool may have dropped it since
            self._drop(key)
            return None
        return hit[0]

    def put(self, root: Path | str, name: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 8:
            return
        key = (str(root), name)
        if key in self.items:
            self._drop(key)
        self.items[key] = (data, time.monotonic())
        self.size += len(data)
        while self.size > self.max_bytes:
            self._drop(next(iter(self.items)))

    def _drop(self, key: tuple[str, str]) -> None:
        data, _ = self.items.pop(key)
        self.size -= len(data)
