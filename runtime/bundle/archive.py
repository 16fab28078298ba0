"""A bundle as one .tar.gz: packed from a directory, unpacked (and verified) into one, or opened
from either form.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path

from runtime.bundle.fs import MANIFEST, BundleError, check_member_name, open_regular, sha256_fd, unlisted_entries  # noqa: F401
from runtime.bundle.load import Bundle, load_bundle
from runtime.fsio import replace_dir


def pack(bundle_dir: str | os.PathLike[str], archive: str | os.PathLike[str]) -> Path:
    """Verify a bundle and write it as a single ``.tar.gz`` (atomic)."""
    bundle = load_bundle(bundle_dir)
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            # Manifest first: a station reads (and checks the signature over) it before any other member.
            for name in [MANIFEST, *sorted(bundle.manifest.files)]:
                tar.add(bundle.path / name, arcname=name, recursive=False)
        os.replace(tmp, archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return archive


def unpack(archive: str | os.PathLike[str], dest: str | os.PathLike[str], check_graph: bool = True) -> Bundle:
    """Extract a bundle archive to ``dest`` (atomic) and verify it; unsafe or unlisted members are refused."""
    from runtime.bundle.stage import stage_bundle

    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise BundleError(f"{archive}: no such archive")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        stage_bundle(archive, tmp, check_graph=check_graph)
        _world_readable(tmp)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(dest, check_graph=False)


def _world_readable(tree: Path) -> None:
    """0755 dirs / 0644 files: the daemon's unprivileged user reads what root staged privately (0700)."""
    os.chmod(tree, 0o755)
    for dirpath, dirnames, filenames in os.walk(tree):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


def open_bundle(path: str | os.PathLike[str], workdir: str | os.PathLike[str] | None = None) -> Bundle:
    """Load a bundle directory, or unpack an archive (into ``workdir`` or a temp dir) and load it."""
    p = Path(path)
    if p.is_file():
        target = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="defectscope-bundle-"))
        return unpack(p, target / p.name.removesuffix(".tar.gz").removesuffix(".tgz"))
    return load_bundle(p)
