"""Bundle files on disk, read without trusting them: safe member names, no-follow opens, listings.

The base of ``runtime.bundle.manifest`` (which re-exports ``BundleError``): nothing here knows the
manifest schema, so both the loader and the staging of untrusted sources use it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that must not be used; the message names the file and key at fault."""


def key_error(where: str, key: str, message: str) -> BundleError:
    """``<file>: key '<dotted.key>': <message>``: the form of every manifest error."""
    return BundleError(f"{where}: key '{key}': {message}")


def require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, prefix: str = "") -> Any:
    """``data[key]`` of type ``kind`` (bool is never an int here), else a BundleError naming ``prefix + key``."""
    full = f"{prefix}{key}"
    if key not in data:
        raise key_error(where, full, "missing")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise key_error(where, full, f"expected {names}, got {type(value).__name__} {value!r:.60}")
    return value


def check_member_name(name: Any, where: str, key: str) -> str:
    """A path inside a bundle: relative, normalized POSIX, no '..', not the manifest itself.

    Every name a manifest uses (``files`` keys, artifact files) passes here before it
    touches a filesystem, so a manifest can never address a path outside its bundle.
    """
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= 1024
        and "\x00" not in name
        and "\\" not in name
        and not name.startswith("/")
        and posixpath.normpath(name) == name
        and all(part not in ("", ".", "..") and len(part) <= 255 for part in name.split("/"))
        and name != MANIFEST
    )
    if not ok:
        raise BundleError(
            f"{where}: key '{key}': {name!r:.80} is not a safe bundle path (expected a relative, "
            f"normalized path inside the bundle without '..', not {MANIFEST})"
        )
    return name


def open_regular(root: Path, name: str, dir_fd: int | None = None) -> int:
    """Open ``root/name`` read-only without following a symlink anywhere below ``root``.

    Returns a file descriptor of a regular file; raises BundleError for a symlink, FIFO,
    device, directory or missing entry (a FIFO would block a reader, a symlink escape the bundle).
    ``dir_fd``: an open descriptor of ``root`` to read through (``root`` then only names it in
    messages), so a directory renamed over ``root`` after it was checked is never read.
    """
    fd = os.dup(dir_fd) if dir_fd is not None else os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in name.split("/")[:-1]:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise BundleError(f"{root / name}: listed in manifest 'files' but missing") from None
            except OSError:
                raise BundleError(f"{root / name}: directory {part!r} is a symlink or not a directory") from None
            os.close(fd)
            fd = nfd
        try:
            ffd = os.open(name.split("/")[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError:
            raise BundleError(f"{root / name}: listed in manifest 'files' but missing") from None
        except OSError as exc:
            raise BundleError(f"{root / name}: not a regular file ({exc.strerror}; symlinks are refused)") from None
    finally:
        os.close(fd)
    mode = os.fstat(ffd).st_mode
    if not stat.S_ISREG(mode):
        os.close(ffd)
        raise BundleError(
            f"{root / name}: not a regular file (mode {stat.filemode(mode)}); bundles hold regular files only"
        )
    return ffd


def sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def unlisted_entries(path: Path, names: Iterable[str], dir_fd: int | None = None) -> list[str]:
    """Entries under ``path`` the manifest does not list (symlinks, FIFOs and stray files alike).

    ``dir_fd``: walk the directory open there (``os.fwalk``, never following symlinks) instead of ``path``.
    """
    listed = set(names) | {MANIFEST}
    dirs = set()
    for n in listed:
        d = posixpath.dirname(n)
        while d:
            dirs.add(d)
            d = posixpath.dirname(d)
    extra = []
    walk = (
        ((rel, dn, fn, dfd) for rel, dn, fn, dfd in os.fwalk(".", dir_fd=dir_fd))
        if dir_fd is not None
        else ((os.path.relpath(dp, path), dn, fn, None) for dp, dn, fn in os.walk(path))
    )
    for dirpath, dirnames, filenames, dfd in walk:
        rel = "" if dirpath == "." else dirpath.removeprefix("./")
        for d in list(dirnames):
            full = posixpath.join(rel, d) if rel else d
            is_link = (
                stat.S_ISLNK(os.stat(d, dir_fd=dfd, follow_symlinks=False).st_mode)
                if dfd is not None
                else os.path.islink(os.path.join(path, rel, d))
            )
            if full not in dirs or is_link:
                extra.append(full + "/")
                dirnames.remove(d)
        for f in filenames:
            full = posixpath.join(rel, f) if rel else f
            if full not in listed:
                extra.append(full)
    return sorted(extra)
