"""Loading a bundle directory: its manifest read and checked, every file's sha256 verified, nothing
unlisted accepted (``strict``), the ONNX graph's inputs/outputs checked against the manifest.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle.fs import MANIFEST, BundleError, check_member_name, open_regular, sha256_fd, unlisted_entries  # noqa: F401
from runtime.bundle.manifest import Artifact, Manifest
from runtime.bundle.output import check_output_shapes
from runtime.inference.ort_session import ort_session
from runtime.inference.preprocess import FLOAT_NCHW, UINT8_NHWC, input_shape


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    def artifact(self, key: str | None = None) -> Artifact:
        key = key or self.manifest.default_artifact
        if key not in self.manifest.artifacts:
            raise BundleError(
                f"{self.path / MANIFEST}: key 'artifacts': no artifact {key!r}; "
                f"this bundle has {sorted(self.manifest.artifacts)}"
            )
        return self.manifest.artifacts[key]

    def artifact_path(self, key: str | None = None) -> Path:
        return self.path / self.artifact(key).file

    def check_onnx(self, key: str | None = None) -> None:
        """Check an ONNX artifact's graph against the manifest (input name/shape, outputs, classes)."""
        art = self.artifact(key)
        path = self.path / art.file
        if art.format != "onnx":
            raise BundleError(f"{path}: artifact is {art.format}, not onnx")
        try:
            sess = ort_session(path, 1, optimize=False)
        except Exception as exc:  # ORT raises several types for a corrupt model
            raise BundleError(f"{path}: not a loadable ONNX model: {exc}") from None
        check_graph_io(self.manifest, sess.get_inputs(), sess.get_outputs(), str(path), art.input)


# ONNX Runtime's / OpenVINO's spelling of each input kind's element type (checked when the I/O object has one).
_ELEMENT_TYPES = {FLOAT_NCHW: ("tensor(float)", "f32", "float32"), UINT8_NHWC: ("tensor(uint8)", "u8", "uint8")}


def check_graph_io(
    manifest: Manifest, inputs: list[Any], outputs: list[Any], where: str, input_kind: str = FLOAT_NCHW
) -> None:
    """Compare a model's I/O (objects with .name and .shape, optionally .type) with the manifest and
    the artifact's input kind; raise BundleError."""
    spec = manifest.input
    if len(inputs) != 1:
        raise BundleError(f"{where}: expected 1 input tensor, the graph has {[i.name for i in inputs]}")
    inp = inputs[0]
    if inp.name != spec.name:
        raise BundleError(f"{where}: input name {inp.name!r} does not match manifest input.name {spec.name!r}")
    per_image = input_shape(spec, input_kind)
    want = [None, *per_image]
    shape = list(inp.shape)
    if len(shape) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(shape, want)):
        dims = f"(N,{','.join(map(str, per_image))})"
        what = f"the artifact's input {input_kind} {dims}" if input_kind == UINT8_NHWC else f"manifest input {dims}"
        raise BundleError(f"{where}: input shape {shape} does not match {what}")
    etype = getattr(inp, "type", None)
    if isinstance(etype, str) and etype not in _ELEMENT_TYPES[input_kind]:
        raise BundleError(f"{where}: input element type {etype} does not match the artifact's input {input_kind}")
    names = [o.name for o in outputs]
    if list(manifest.output.names) != names:
        raise BundleError(
            f"{where}: output names {names} do not match manifest output.names {list(manifest.output.names)}"
        )
    check_output_shapes(manifest.model.task, manifest.output, len(manifest.classes), outputs, where)


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``manifest.json`` of a bundle directory (no checksum pass)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing: {Path(path)} is not a bundle (or was not completely written)")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON: {exc}") from None
    return Manifest.from_dict(data, where=str(mpath))


def verify_files(path: Path, manifest: Manifest, strict: bool = True) -> None:
    """Every listed file is a regular file inside ``path`` with its sha256; ``strict``: nothing unlisted."""
    if not manifest.files:
        raise BundleError(f"{path / MANIFEST}: key 'files': empty; a bundle must list a checksum for each file")
    for name, digest in manifest.files.items():
        actual = sha256_fd(open_regular(path, name))
        if actual != digest:
            raise BundleError(
                f"{path / name}: checksum mismatch (manifest sha256 {digest[:12]}..., file {actual[:12]}...)"
            )
    if strict:
        extra = unlisted_entries(path, manifest.files)
        if extra:
            raise BundleError(
                f"{path}: holds {len(extra)} file(s) the manifest does not list ({', '.join(extra[:5])}); "
                "a bundle carries exactly the files its manifest (and so its signature) covers"
            )


def load_bundle(
    path: str | os.PathLike[str], verify: bool = True, check_graph: bool = True, strict: bool = True
) -> Bundle:
    """Load a bundle directory: schema, checksums and (for ONNX) graph I/O are checked.

    Raises BundleError naming the file/key at fault.
    """
    root = Path(path)
    if root.is_file() and tarfile.is_tarfile(root):
        raise BundleError(f"{root}: is an archive; unpack it first (defectscope bundle unpack)")
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    root = root.resolve()  # pin a `current` symlink to the version it names now
    manifest = read_manifest(root)
    bundle = Bundle(root, manifest)
    if verify:
        verify_files(root, manifest, strict=strict)
        if check_graph:
            for key, art in manifest.artifacts.items():
                if art.format == "onnx":
                    bundle.check_onnx(key)
    return bundle
