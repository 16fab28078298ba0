"""The model bundle: the contract between the workstation and the device.

A bundle is a directory holding model files (ONNX, TensorRT engines) and a
``manifest.json`` describing them (see docs/contracts.md). Bundles are written
atomically (assembled in a temp directory beside the destination, manifest
last, then renamed into place) and every load verifies the manifest schema and
each file's sha256, so a half-written or tampered bundle is refused, never used.

This module is the format (``Manifest``, ``Artifact``); loading is ``runtime.bundle.load``, writing
``runtime.bundle.write``, the .tar.gz form ``runtime.bundle.archive``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.bundle.fs import MANIFEST, BundleError, check_member_name, open_regular, sha256_fd, unlisted_entries  # noqa: F401
from runtime.bundle.fs import key_error as _err
from runtime.bundle.fs import require as _require
from runtime.bundle.output import TASK_OUTPUT_KINDS, OutputSpec, parse_output
from runtime.fsio import fsync_dir, sha256_file
from runtime.inference.preprocess import FLOAT_NCHW, INPUT_KINDS, InputSpec, SpecError

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
