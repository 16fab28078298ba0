"""Reading files as root that another account may control: owner and mode checked on the open
descriptor (never a path looked up before), no-follow, non-blocking, size-capped."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from deploy.config import DeployError


def owned_by_root(what: str) -> Callable[[str, os.stat_result, bool], None]:
    """As root, install only what root wrote: a file the daemon user could create or swap is refused.

    Applied to ``fstat`` of the opened bundle (and every entry of a directory bundle), not to a
    path looked up before: the daemon user can write its own state directory and rename another
    file or directory over the path at any time.
    """

    def check(where: str, st: os.stat_result, top: bool) -> None:
        # Below the top, a symlink or FIFO root made is refused by the bundle inspection, naming its type.
        link = stat.S_ISLNK(st.st_mode)
        problem = None
        if link and top:
            problem = "is a symlink"
        elif st.st_uid != 0:
            problem = f"is owned by uid {st.st_uid}, not root"
        elif st.st_mode & 0o022 and not link:
            problem = f"is writable by group or others (mode {stat.filemode(st.st_mode)})"
        elif top and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            problem = "is not a regular file or directory"
        if problem:
            raise DeployError(
                f"{where}: the {what} {problem}; deploy runs as root and only installs files root owns "
                "(copy it into a root-only directory such as /var/lib/defectscope-deploy/incoming first)"
            )

    return check


def read_checked(path: Path, what: str, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path``, opened no-follow and non-blocking, owner
    checked on the descriptor (as root); refused when larger."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DeployError(f"{path}: cannot open the {what} ({exc.strerror}; symlinks are refused)") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if os.geteuid() == 0:
            owned_by_root(what)(str(path), st, True)
        if not stat.S_ISREG(st.st_mode):
            raise DeployError(f"{path}: the {what} is not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise DeployError(f"{path}: the {what} is larger than {limit} bytes")
    return data
