"""Writing a bundle directory atomically: assembled in a temp directory beside the destination,
manifest last, verified as a station would load it, then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.bundle.fs import MANIFEST, BundleError, check_member_name, open_regular, sha256_fd, unlisted_entries  # noqa: F401
from runtime.bundle.load import Bundle, load_bundle
from runtime.bundle.manifest import Artifact, Manifest
from runtime.fsio import atomic_write_json, replace_dir, sha256_file


def _place(src: Path, dst: Path) -> None:
    """Copy (never hard-link: a source rewritten in place later must not change the bundle)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def write_bundle(
    dest: str | os.PathLike[str],
    manifest: Manifest,
    files: Mapping[str, str | os.PathLike[str]],
    check_graph: bool = True,
) -> Bundle:
    """Write a bundle atomically: files (name in bundle -> source path) + manifest.

    Checksums are computed here and replace ``manifest.files``. The bundle is
    assembled in a temp directory beside ``dest`` and renamed into place only
    after it verifies, so readers never see a partial bundle.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for key, art in manifest.artifacts.items():
        if art.file not in files:
            raise BundleError(
                f"{dest / MANIFEST}: key 'artifacts.{key}.file': {art.file!r} is not among the files given"
            )
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        digests = {}
        for name, src in sorted(files.items()):
            if os.path.isabs(name) or ".." in Path(name).parts or name == MANIFEST:
                raise BundleError(f"{dest}: file name {name!r} must be relative, inside the bundle, not {MANIFEST}")
            src = Path(src)
            if not src.is_file():
                raise BundleError(f"{src}: source file for bundle entry {name!r} does not exist")
            _place(src, tmp / name)
            digests[name] = sha256_file(tmp / name)
        final = manifest.replace(files=digests)
        # Round-trip through the validator so we never write what we would refuse to read.
        final = Manifest.from_dict(final.to_dict(), where=str(dest / MANIFEST))
        atomic_write_json(tmp / MANIFEST, final.to_dict())
        load_bundle(tmp, verify=True, check_graph=check_graph)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(dest.resolve(), final)


def _existing_files(bundle: Bundle) -> dict[str, Path]:
    return {name: bundle.path / name for name in bundle.manifest.files}


def add_artifact(
    bundle_dir: str | os.PathLike[str],
    key: str,
    artifact: Artifact,
    src_file: str | os.PathLike[str],
    metrics: Mapping[str, Any] | None = None,
    make_default: bool = False,
    provenance: Mapping[str, Any] | None = None,
    check_graph: bool = True,
) -> Bundle:
    """Add (or replace) one artifact of an existing bundle, rewriting it atomically."""
    bundle = load_bundle(bundle_dir, check_graph=False)
    m = bundle.manifest
    files = _existing_files(bundle)
    if key in m.artifacts and m.artifacts[key].file != artifact.file:
        files.pop(m.artifacts[key].file, None)
    files[artifact.file] = Path(src_file)
    new_metrics = dict(m.metrics)
    if metrics is not None:
        new_metrics[key] = dict(metrics)
    manifest = m.replace(
        artifacts={**m.artifacts, key: artifact},
        default_artifact=key if make_default else m.default_artifact,
        metrics=new_metrics,
        provenance={**m.provenance, **(provenance or {})},
    )
    return write_bundle(bundle.path, manifest, files, check_graph=check_graph)


def update_manifest(bundle_dir: str | os.PathLike[str], **changes: Any) -> Bundle:
    """Rewrite a bundle with manifest fields changed (e.g. metrics, default_artifact)."""
    bundle = load_bundle(bundle_dir, check_graph=False)
    return write_bundle(bundle.path, bundle.manifest.replace(**changes), _existing_files(bundle), check_graph=False)
