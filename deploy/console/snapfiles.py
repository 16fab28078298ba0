"""Read-only, path-confined access to a station's snapshot spool (the console's only file input).

A request names a station and a file name; the name is checked against the spool's naming
scheme (no separators, no dot-files), opened relative to the configured spool directory with
O_NOFOLLOW (a symlink planted in the spool is refused, not followed), and must be a regular
file no larger than the configured cap. Nothing outside the spool is ever opened.
"""

from __future__ import annotations

import os
import re
import stat
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
