"""The model bundle: the contract between the workstation and the device.

A bundle is a directory holding model files (ONNX, TensorRT engines) and a
``manifest.json`` describing them (see docs/contracts.md). Bundles are written
atomically (assembled in a temp directory beside the destination, manifest
last, then renamed into place) and every load verifies the manifest schema and
each file's sha256, so a half-written or tampered bundle is refused, never used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.bundle.fs import MANIFEST, BundleError, check_member_name, open_regular, sha256_fd, unlisted_entries  # noqa: F401
from runtime.bundle.fs import key_error as _err
from runtime.bundle.fs import require as _require
from runtime.bundle.output import TASK_OUTPUT_KINDS, OutputSpec, check_output_shapes, parse_output
from runtime.fsio import atomic_write_json, fsync_dir, replace_dir, sha256_file
from runtime.inference.ort_session import ort_session
from runtime.inference.preprocess import FLOAT_NCHW, INPUT_KINDS, UINT8_NHWC, InputSpec, SpecError, input_shape

__all__ = ["sha256_file", "fsync_dir"]  # re-exported: the one implementation lives in runtime.fsio

SCHEMA_VERSION = 1
FORMATS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    task: str = "classification"
    architecture: str = ""
    created: str = ""


@dataclass(frozen=True)
class Artifact:
    """One runnable model file of the bundle (a precision / format)."""

    file: str
    format: str
    precision: str
    quantization: Mapping[str, Any] | None = None
    tensorrt_version: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    batch: tuple[int, int] | None = None  # (min, max) of the engine's optimisation profile
    extra: Mapping[str, Any] = field(default_factory=dict)
    input: str = FLOAT_NCHW  # what the input tensor takes (preprocess.INPUT_KINDS); absent in old bundles

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "format": self.format, "precision": self.precision}
        if self.input != FLOAT_NCHW:
            out["input"] = self.input  # float artifacts serialise exactly as before
        for key in ("quantization", "tensorrt_version", "gpu", "compute_capability"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.batch is not None:
            out["batch"] = list(self.batch)
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    classes: tuple[str, ...]
    input: InputSpec
    output: OutputSpec
    artifacts: Mapping[str, Artifact]
    default_artifact: str
    good_classes: tuple[str, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # ---- (de)serialisation -------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = MANIFEST) -> Manifest:
        """Validate and build; every problem names the key and what was expected."""
        if not isinstance(data, Mapping):
            raise BundleError(f"{where}: expected a JSON object at the top level")
        version = _require(data, "schema_version", int, where)
        if version != SCHEMA_VERSION:
            raise _err(where, "schema_version", f"this runtime reads version {SCHEMA_VERSION}, the bundle is {version}")
        m = _require(data, "model", Mapping, where)
        task = m.get("task", "classification")
        if task not in TASK_OUTPUT_KINDS:
            raise _err(where, "model.task", f"expected one of {sorted(TASK_OUTPUT_KINDS)}, got {task!r}")
        model = ModelInfo(
            name=_require(m, "name", str, where, "model."),
            version=str(_require(m, "version", (str, int, float), where, "model.")),
            task=task,
            architecture=str(m.get("architecture", "")),
            created=str(m.get("created", "")),
        )
        classes = _require(data, "classes", list, where)
        if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
            raise _err(where, "classes", f"expected a non-empty list of unique class names, got {classes!r:.80}")
        good = data.get("good_classes", [])
        if not isinstance(good, list) or any(g not in classes for g in good):
            raise _err(where, "good_classes", f"expected a list of names from 'classes' {classes}, got {good!r}")
        try:
            spec = InputSpec.from_dict(_require(data, "input", Mapping, where))
        except SpecError as exc:
            raise BundleError(f"{where}: {exc}") from None
        output = parse_output(_require(data, "output", Mapping, where), task, spec, where)
        raw_artifacts = _require(data, "artifacts", Mapping, where)
        if not raw_artifacts:
            raise _err(where, "artifacts", "expected at least one model artifact")
        artifacts = {key: _artifact(key, a, where) for key, a in raw_artifacts.items()}
        default = _require(data, "default_artifact", str, where)
        if default not in artifacts:
            raise _err(where, "default_artifact", f"{default!r} is not one of the artifacts {sorted(artifacts)}")
        files = data.get("files", {})
        if not isinstance(files, Mapping) or not all(
            isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in files.values()
        ):
            raise _err(where, "files", "expected an object mapping file name -> sha256 hex digest (64 lowercase hex)")
        for name in files:
            check_member_name(name, where, f"files.{name!r:.80}")
        for key, art in artifacts.items():
            if files and art.file not in files:
                raise _err(where, f"artifacts.{key}.file", f"{art.file!r} has no checksum in 'files'")
        for key in ("provenance", "metrics"):
            if not isinstance(data.get(key, {}), Mapping):
                raise _err(where, key, "expected an object")
        return cls(
            model=model,
            classes=tuple(classes),
            good_classes=tuple(good),
            input=spec,
            output=output,
            artifacts=artifacts,
            default_artifact=default,
            files=dict(files),
            provenance=dict(data.get("provenance", {})),
            metrics=dict(data.get("metrics", {})),
            schema_version=version,
        )

    def to_dict(self) -> dict[str, Any]:
        output = self.output.to_dict()
        return {
            "schema_version": self.schema_version,
            "model": dataclasses.asdict(self.model),
            "classes": list(self.classes),
            "good_classes": list(self.good_classes),
            "input": self.input.to_dict(),
            "output": output,
            "artifacts": {k: a.to_dict() for k, a in self.artifacts.items()},
            "default_artifact": self.default_artifact,
            "files": dict(self.files),
            "provenance": dict(self.provenance),
            "metrics": dict(self.metrics),
        }

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


def _artifact(key: str, a: Any, where: str) -> Artifact:
    prefix = f"artifacts.{key}."
    if not isinstance(a, Mapping):
        raise _err(where, f"artifacts.{key}", "expected an object")
    fmt = _require(a, "format", str, where, prefix)
    if fmt not in FORMATS:
        raise _err(where, prefix + "format", f"expected one of {FORMATS}, got {fmt!r}")
    precision = _require(a, "precision", str, where, prefix)
    if precision not in PRECISIONS:
        raise _err(where, prefix + "precision", f"expected one of {PRECISIONS}, got {precision!r}")
    file = check_member_name(_require(a, "file", str, where, prefix), where, prefix + "file")
    batch = a.get("batch")
    if batch is not None and not (
        isinstance(batch, list) and len(batch) == 2 and all(isinstance(b, int) and b > 0 for b in batch)
    ):
        raise _err(where, prefix + "batch", f"expected [min, max] positive integers, got {batch!r}")
    if "calibration_cache" in a:  # a file of the bundle too (TensorRT INT8 calibration cache)
        check_member_name(a["calibration_cache"], where, prefix + "calibration_cache")
    kind = a.get("input", FLOAT_NCHW)
    if kind not in INPUT_KINDS:
        raise _err(where, prefix + "input", f"expected one of {INPUT_KINDS}, got {kind!r:.80}")
    known = {"file", "format", "precision", "quantization", "tensorrt_version", "gpu", "compute_capability", "batch"}
    known |= {"input"}
    return Artifact(
        file=file,
        format=fmt,
        precision=precision,
        quantization=a.get("quantization"),
        tensorrt_version=a.get("tensorrt_version"),
        gpu=a.get("gpu"),
        compute_capability=a.get("compute_capability"),
        batch=tuple(batch) if batch else None,
        extra={k: v for k, v in a.items() if k not in known},
        input=kind,
    )


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
