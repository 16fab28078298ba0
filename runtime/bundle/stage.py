"""Bringing an untrusted bundle (directory or ``.tar.gz``) into a private staging directory.

Station code: ``deploy install`` (as root) and ``bundle unpack`` use it. The order is the
defence: (1) read only ``manifest.json`` (size-capped) and validate every path it names;
(2) inspect the source's listing — member count, declared sizes, types, unlisted or
duplicate entries — without writing anything; (3) the caller checks the signature over the
manifest bytes; (4) only then are the listed regular files copied into the staging
directory, hashed while copied, fsynced, and compared with the manifest. A failure at any
step leaves nothing outside the staging directory, which the caller removes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from runtime.bundle.load import Bundle, load_bundle
from runtime.bundle.manifest import MANIFEST, BundleError, Manifest, check_member_name, open_regular, unlisted_entries
from runtime.fsio import fsync_dir

MAX_BUNDLE_MIB = 4096  # sum of the bundle's file sizes (ONNX + engines of one model)
MAX_FILES = 64  # files in one bundle (a model, its precisions, a held-out sample)
MAX_MANIFEST_BYTES = 4 << 20
# One pax / GNU long-name header: a 1 KiB member name plus attributes. tarfile reads each whole
# into memory before the member is seen, so this bounds the memory an archive takes before its signature.
MAX_HEADER_BYTES = 64 << 10
MAX_HEADER_CHAIN = 8  # extended headers before one member (tarfile recurses once per header)
EXTENDED_HEADERS = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
NAME_IN_MESSAGE = 100  # characters of an untrusted name quoted in an error
SPACE_MARGIN_BYTES = 16 << 20  # left free on the store's filesystem after staging
COPY_CHUNK = 1 << 20


class HeaderLimitError(tarfile.TarError):
    """An archive header over a limit (``tarfile`` passes any non-``HeaderError`` up as is)."""


@dataclass(frozen=True)
class Limits:
    """Caps checked before anything is written (an archive bomb fails before it expands)."""

    max_bytes: int = MAX_BUNDLE_MIB << 20
    max_files: int = MAX_FILES


def _parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: not valid JSON: {exc}") from None
    return Manifest.from_dict(doc, where=where)


def _check_totals(where: str, sizes: dict[str, int], limits: Limits) -> int:
    if len(sizes) > limits.max_files:
        raise BundleError(
            f"{where}: {len(sizes)} files, more than the limit of {limits.max_files} "
            "([install] max_files in deploy.toml)"
        )
    total = sum(sizes.values())
    if total > limits.max_bytes:
        raise BundleError(
            f"{where}: {total / 2**20:.1f} MiB of files, more than the limit of "
            f"{limits.max_bytes / 2**20:.0f} MiB ([install] max_bundle_mib in deploy.toml)"
        )
    return total


class _BoundedTarInfo(tarfile.TarInfo):
    """``tarfile`` reads a GNU long name or a pax header whole into memory (before any signature check):
    refuse one over ``MAX_HEADER_BYTES``, a chain of more than ``MAX_HEADER_CHAIN``, and sparse members.

    ``_proc_member`` is the hook ``tarfile`` documents for subclasses; ``_proc_gnusparse_*`` read
    a sparse map whose length the header declares.
    """

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in EXTENDED_HEADERS:
            if self.size > MAX_HEADER_BYTES:
                raise HeaderLimitError(
                    f"an extended header (type {self.type.decode(errors='replace')!r}) of {self.size} bytes, "
                    f"over the limit of {MAX_HEADER_BYTES}"
                )
            depth = getattr(tar, "_defectscope_header_depth", 0)
            if depth >= MAX_HEADER_CHAIN:
                raise HeaderLimitError(f"more than {MAX_HEADER_CHAIN} extended headers before one member")
            setattr(tar, "_defectscope_header_depth", depth + 1)  # noqa: B010  (tarfile recurses per header)
            try:
                return super()._proc_member(tar)  # type: ignore[misc]
            finally:
                setattr(tar, "_defectscope_header_depth", depth)  # noqa: B010
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise HeaderLimitError("a sparse member (bundles hold regular files only)")
        return super()._proc_member(tar)  # type: ignore[misc]

    def _refuse_sparse(self, *_args: object) -> None:
        raise HeaderLimitError("a sparse member (bundles hold regular files only)")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


def short(name: str, limit: int = NAME_IN_MESSAGE) -> str:
    """``repr(name)`` cut to ``limit`` characters: an attacker's name never floods a log or stdout."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(name)} characters)"


class BundleSource:
    """An untrusted bundle, inspected but not yet copied. ``manifest_bytes`` is what a signature covers.

    The source is opened once (no symlink followed, a FIFO never blocks); ``trust(where, stat,
    top)`` (deploy as root: owner and mode) is called on ``fstat`` of that descriptor, and for a
    directory on every entry below it (``top`` False), before anything is read; every later read goes through that descriptor, so a
    file or directory renamed over ``source`` after the check is never read.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        limits: Limits = Limits(),
        trust: Callable[[str, os.stat_result, bool], None] | None = None,
    ):
        self.source = Path(source)
        self.limits = limits
        self._fh: BinaryIO | None = None
        self._dirfd: int | None = None
        try:
            fd = os.open(self.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BundleError(f"{self.source}: no such bundle") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BundleError(f"{self.source}: is a symlink; symlinks and special files are refused") from None
            raise BundleError(f"{self.source}: cannot open the bundle ({exc.strerror})") from None
        try:
            self.stat = os.fstat(fd)  # of what was opened, never of a path looked up again
            if not (stat.S_ISDIR(self.stat.st_mode) or stat.S_ISREG(self.stat.st_mode)):
                raise BundleError(
                    f"{self.source}: not a bundle directory or a bundle archive (.tar.gz); "
                    "symlinks and special files are refused"
                )
            if trust is not None:
                trust(str(self.source), self.stat, True)
            if stat.S_ISDIR(self.stat.st_mode):
                self.kind = "directory"
                self._dirfd = fd
                if trust is not None:
                    self._trust_entries(trust)
                self._inspect_dir()
            else:
                self.kind = "archive"
                self._fh = os.fdopen(fd, "rb")
                self._inspect_archive()
        except BaseException:
            if self._fh is None and self._dirfd is None:
                os.close(fd)
            self.close()
            raise

    # ---- inspection (nothing written) -----------------------------------------
    def _trust_entries(self, trust: Callable[[str, os.stat_result, bool], None]) -> None:
        for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=self._dirfd):
            for entry in dirnames + filenames:
                trust(str(self.source / dirpath / entry), os.stat(entry, dir_fd=dfd, follow_symlinks=False), False)

    def _inspect_dir(self) -> None:
        fd = open_regular(self.source, MANIFEST, dir_fd=self._dirfd)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
        self._set_manifest(data, str(self.source / MANIFEST))
        extra = unlisted_entries(self.source, self.manifest.files, dir_fd=self._dirfd)
        if extra:
            raise BundleError(
                f"{self.source}: holds {len(extra)} file(s) its manifest does not list "
                f"({', '.join(short(e) for e in extra[:5])}); refusing the bundle (only listed files are signed)"
            )
        sizes = {}
        for name in self.manifest.files:
            fd = open_regular(self.source, name, dir_fd=self._dirfd)
            sizes[name] = os.fstat(fd).st_size
            os.close(fd)
        self.total_bytes = _check_totals(str(self.source), sizes, self.limits)

    def _inspect_archive(self) -> None:
        where = str(self.source)
        members: dict[str, tarfile.TarInfo] = {}
        dirs: set[str] = set()
        total = 0
        try:
            try:
                tar = self._tar()
            except tarfile.ReadError:
                raise BundleError(f"{where}: not a bundle directory or a bundle archive (.tar.gz)") from None
            with tar:
                for count, m in enumerate(tar, start=1):
                    if count > self.limits.max_files + 16:  # + directories; stop reading a member bomb early
                        raise BundleError(f"{where}: more than {self.limits.max_files} members; refusing the archive")
                    name = m.name[2:] if m.name.startswith("./") else m.name
                    name = name.rstrip("/") if m.isdir() else name
                    if name not in (MANIFEST, "", ".") and not _safe(name):
                        raise BundleError(
                            f"{where}: unsafe archive member {short(m.name)} (absolute, '..' or not normalized)"
                        )
                    if m.isdir():
                        dirs.add(name)
                        continue
                    if not m.isreg():
                        raise BundleError(
                            f"{where}: member {short(m.name)} is not a regular file (links, FIFOs and devices are refused)"
                        )
                    if name in members:
                        raise BundleError(f"{where}: member {short(name)} appears twice; refusing an ambiguous archive")
                    members[name] = m
                    total += m.size
                    if total > self.limits.max_bytes:
                        _check_totals(where, {n: i.size for n, i in members.items()}, self.limits)
                if MANIFEST not in members:
                    raise BundleError(f"{where}: archive has no {MANIFEST}")
                if members[MANIFEST].size > MAX_MANIFEST_BYTES:
                    raise BundleError(
                        f"{where}: {MANIFEST} is {members[MANIFEST].size} bytes, over {MAX_MANIFEST_BYTES}"
                    )
                fh = tar.extractfile(members[MANIFEST])
                assert fh is not None  # isreg() above
                self._set_manifest(fh.read(), f"{where}!{MANIFEST}")
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            raise BundleError(f"{where}: not a readable bundle archive: {str(exc)[: NAME_IN_MESSAGE * 2]}") from None
        listed = set(self.manifest.files) | {MANIFEST}
        stray = sorted(set(members) - listed)
        missing = sorted(set(self.manifest.files) - set(members))
        parents = {posixpath.dirname(n) for n in listed}
        for p in list(parents):
            while p:
                parents.add(p)
                p = posixpath.dirname(p)
        stray += sorted(d + "/" for d in dirs if d not in parents and d not in ("", "."))
        if stray:
            raise BundleError(
                f"{where}: holds member(s) its manifest does not list ({', '.join(short(n) for n in stray[:5])}); "
                "refusing the archive (only listed files are signed)"
            )
        if missing:
            raise BundleError(f"{where}: {short(missing[0])}: listed in manifest 'files' but not in the archive")
        self._members = members
        self.total_bytes = _check_totals(where, {n: members[n].size for n in self.manifest.files}, self.limits)

    def _tar(self) -> tarfile.TarFile:
        assert self._fh is not None
        self._fh.seek(0)
        return tarfile.open(fileobj=self._fh, mode="r:*", tarinfo=_BoundedTarInfo)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None

    def _set_manifest(self, data: bytes, where: str) -> None:
        if len(data) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{where}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
        self.manifest_bytes = data
        self.manifest = _parse_manifest(data, where)
        self.manifest_sha256 = hashlib.sha256(data).hexdigest()

    # ---- copying (after the caller's signature check) -------------------------
    def extract(self, staged: str | os.PathLike[str], check_graph: bool = True) -> Bundle:
        """Copy the listed files into the new private directory ``staged`` and verify them."""
        staged = Path(staged)
        _check_space(staged.parent, self.total_bytes, str(self.source))
        os.mkdir(staged, 0o700)
        try:
            if self.kind == "directory":
                for name, digest in self.manifest.files.items():
                    with os.fdopen(open_regular(self.source, name, dir_fd=self._dirfd), "rb") as src:
                        _copy_verified(src, staged, name, digest, os.fstat(src.fileno()).st_size)
            else:
                with self._tar() as tar:
                    for name, digest in self.manifest.files.items():
                        member = tar.extractfile(self._members[name])
                        assert member is not None
                        _copy_verified(member, staged, name, digest, self._members[name].size)
            _write_synced(staged / MANIFEST, self.manifest_bytes)
            for d in sorted({posixpath.dirname(n) for n in self.manifest.files} - {""}, reverse=True):
                fsync_dir(staged / d)
            fsync_dir(staged)
        except OSError as exc:
            raise BundleError(_os_message(exc, staged)) from None
        except tarfile.TarError as exc:
            raise BundleError(f"{self.source}: archive became unreadable while extracting: {exc}") from None
        return load_bundle(staged, verify=True, check_graph=check_graph)


def _safe(name: str) -> bool:
    try:
        check_member_name(name, "", "")
    except BundleError:
        return False
    return True


def _os_message(exc: OSError, where: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: no space left on the device while staging the bundle ({exc.strerror}); nothing was installed"
    return f"{getattr(exc, 'filename', None) or where}: {exc.strerror or exc}"


def _check_space(directory: Path, need: int, where: str) -> None:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if need + SPACE_MARGIN_BYTES > free:
        raise BundleError(
            f"{where}: needs {need / 2**20:.1f} MiB (+{SPACE_MARGIN_BYTES >> 20} MiB margin) in "
            f"{directory}, which has {free / 2**20:.1f} MiB free; nothing was installed"
        )


def _copy_verified(src, staged: Path, name: str, digest: str, size: int) -> None:
    """Stream ``src`` to ``staged/name`` (no more than ``size`` bytes), fsync it, check its sha256."""
    dst = staged / name
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    h = hashlib.sha256()
    written = 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        while block := src.read(min(COPY_CHUNK, size - written + 1)):
            written += len(block)
            if written > size:
                raise BundleError(f"{name}: grew while being copied (more than {size} bytes); refusing it")
            h.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    if h.hexdigest() != digest:
        raise BundleError(f"{name}: checksum mismatch (manifest sha256 {digest[:12]}..., file {h.hexdigest()[:12]}...)")


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def stage_bundle(
    source: str | os.PathLike[str], staged: str | os.PathLike[str], limits: Limits = Limits(), check_graph: bool = True
) -> Bundle:
    """Inspect + extract without a signature step (``bundle unpack``); ``staged`` must not exist."""
    src = BundleSource(source, limits)
    try:
        return src.extract(staged, check_graph=check_graph)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        src.close()
