"""Planning a TensorRT engine build: which ONNX, network/builder flags, optimisation profile and INT8
mode, decided from the manifest and the TensorRT version alone (pure: tested on CPU), and where the
engine, timing cache and calibration cache are kept. :func:`runtime.engine.build.build_engine` runs a plan.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.engine.meta import (
    Platform,
    slug,
    version_tuple,
)
from runtime.engine.source import BuildError, _find_fp32, _find_symmetric_qdq, _uint8_twin
from runtime.inference.preprocess import FLOAT_NCHW, INPUT_KINDS, UINT8_NHWC, input_shape

PRECISIONS = ("fp32", "fp16", "int8")
INT8_MODES = ("auto", "explicit", "implicit")


@dataclass(frozen=True)
class BuildPlan:
    """What one ``build-engine`` run will do."""

    precision: str
    int8_mode: str | None
    source_key: str
    source_file: str
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    input_name: str
    input_chw: tuple[int, int, int]
    batch: tuple[int, int]
    opt_batch: int
    calib_batch: int
    tensorrt_version: str
    notes: tuple[str, ...] = ()
    input_kind: str = FLOAT_NCHW  # the engine's input binding: float NCHW, or uint8 NHWC (normalised inside)
    dla_core: int | None = None  # build for this DLA core (GPU fallback for layers DLA cannot run)

    @property
    def strongly_typed(self) -> bool:
        return "STRONGLY_TYPED" in self.network_flags

    def profile(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes of the optimisation profile."""
        lo, opt, hi = ((b, *self.input_chw) for b in (self.batch[0], self.opt_batch, self.batch[1]))
        return lo, opt, hi

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-image input shape of the engine (``input_chw`` keeps its name: (H,W,C) for uint8 input)."""
        return self.input_chw

    def calibration_shape(self) -> tuple[int, int, int, int]:
        return (self.calib_batch, *self.input_chw)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("network_flags", "builder_flags", "input_chw", "batch", "notes"):
            out[key] = list(out[key])
        return out


# Detection graphs (Faster R-CNN: ONNX NonMaxSuppression + RoiAlign) need TensorRT 10: its parser imports
# NonMaxSuppression natively and RoiAlign as the ROIAlign_TRT plugin; 8.x had NMS only as experimental.
MIN_DETECTION_TENSORRT = 10
DETECTION_BATCH = 1  # the exported detector has a fixed batch (calibration.export_detection, docs/contracts.md)


def _detection_rules(
    manifest: Any, version: str, major: int, precision: str, batch: tuple[int, int], notes: list[str]
) -> tuple[tuple[int, int], int, list[str]]:
    if major < MIN_DETECTION_TENSORRT:
        raise BuildError(
            f"detection bundles need TensorRT {MIN_DETECTION_TENSORRT} or later (its ONNX parser imports "
            f"NonMaxSuppression and RoiAlign); this device has {version}. Serve the ONNX artifact with "
            "ONNX Runtime, or upgrade JetPack (JetPack 6: TensorRT 10)"
        )
    if precision == "int8":
        raise BuildError(
            "INT8 TensorRT engines of detectors are not built: the station's engine gate compares "
            "class scores, not boxes. Build --precision fp16 (or fp32), or serve the gated ONNX "
            "Runtime INT8 artifact"
        )
    if tuple(batch) != (DETECTION_BATCH, DETECTION_BATCH):
        notes = [
            *notes,
            f"the detector graph has a fixed batch of {DETECTION_BATCH}: profile "
            f"{DETECTION_BATCH}..{DETECTION_BATCH} (asked {batch[0]}..{batch[1]})",
        ]
    return (DETECTION_BATCH, DETECTION_BATCH), DETECTION_BATCH, notes


def plan_build(
    manifest: Any,
    tensorrt_version: str,
    precision: str = "fp16",
    *,
    int8_mode: str = "auto",
    batch: tuple[int, int] = (1, 8),
    opt_batch: int | None = None,
    calib_batch: int = 8,
    strongly_typed: bool | None = None,
    bundle_hint: str = "<bundle>",
    input_kind: str = FLOAT_NCHW,
    dla_core: int | None = None,
) -> BuildPlan:
    """Decide the build for ``manifest`` on TensorRT ``tensorrt_version``; BuildError when impossible."""
    if precision not in PRECISIONS:
        raise BuildError(f"--precision: expected one of {PRECISIONS}, got {precision!r}")
    if input_kind not in INPUT_KINDS:
        raise BuildError(f"--input: expected one of {INPUT_KINDS}, got {input_kind!r}")
    if dla_core is not None and (isinstance(dla_core, bool) or not isinstance(dla_core, int) or dla_core < 0):
        raise BuildError(f"--dla-core: expected a DLA core number >= 0, got {dla_core!r}")
    if dla_core is not None and precision == "fp32":
        raise BuildError("--dla-core: the DLA runs INT8 and FP16 only; build --precision int8 (or fp16)")
    if int8_mode not in INT8_MODES:
        raise BuildError(f"--int8-mode: expected one of {INT8_MODES}, got {int8_mode!r}")
    if manifest.model.task != "classification" and precision == "int8" and int8_mode == "implicit":
        raise BuildError("implicit INT8 calibration is only wired for classification bundles")
    v = version_tuple(tensorrt_version)
    if not v:
        raise BuildError(f"cannot read TensorRT version {tensorrt_version!r}")
    major = v[0]
    if major < 8:
        raise BuildError(f"TensorRT {tensorrt_version} is too old: build-engine supports TensorRT 8.x, 10.x and later")
    notes: list[str] = []
    if manifest.model.task == "detection":
        batch, opt_batch, notes = _detection_rules(manifest, tensorrt_version, major, precision, batch, notes)
    lo, hi = int(batch[0]), int(batch[1])
    if not 1 <= lo <= hi:
        raise BuildError(f"--batch: expected 1 <= MIN <= MAX, got {lo} {hi}")
    opt = hi if opt_batch is None else int(opt_batch)
    if not lo <= opt <= hi:
        raise BuildError(f"--opt-batch {opt} must lie within --batch {lo} {hi}")
    if calib_batch < 1:
        raise BuildError(f"--calib-batch-size must be >= 1, got {calib_batch}")

    network_flags: list[str] = ["EXPLICIT_BATCH"] if major < 10 else []
    builder_flags: list[str] = []
    mode: str | None = None
    if precision == "int8":
        mode = int8_mode if int8_mode != "auto" else ("implicit" if major < 10 else "explicit")
        if mode == "implicit" and major >= 11:
            raise BuildError(
                f"TensorRT {tensorrt_version} removed implicit INT8 calibration; use --int8-mode explicit "
                "(the QDQ model from `defectscope calibrate --target tensorrt`)"
            )
        if mode == "implicit" and major == 10:
            notes.append("implicit INT8 calibration is deprecated in TensorRT 10; explicit (QDQ) is preferred")

    if precision in ("fp32", "fp16") or mode == "implicit":
        key, art = _find_fp32(manifest)
    else:
        key, art = _find_symmetric_qdq(manifest, bundle_hint)
    if input_kind == UINT8_NHWC:
        if mode == "implicit":
            raise BuildError(
                "--input uint8 with implicit INT8 calibration is not supported (the calibrator feeds float "
                "tensors); use --int8-mode explicit (the QDQ twin from `defectscope calibrate --target tensorrt`)"
            )
        key, art = _uint8_twin(manifest, key)
    if dla_core is not None:
        notes.append(
            f"DLA core {dla_core} with GPU fallback: layers the DLA cannot run go to the GPU (the build logs "
            "which); a device without that DLA core gets a GPU engine and the reason is recorded"
        )
        if major >= 11:
            notes.append(f"TensorRT {tensorrt_version}: DLA support depends on the release and platform")

    typed = (major >= 11) if strongly_typed is None else bool(strongly_typed)
    if major >= 11 and not typed:
        raise BuildError(f"TensorRT {tensorrt_version} builds strongly typed networks only")
    if typed and major < 10:
        raise BuildError("--strongly-typed needs TensorRT 10 or later")
    if typed and mode == "implicit":
        raise BuildError("implicit INT8 calibration needs a weakly typed network (drop --strongly-typed)")
    if typed:
        if precision == "fp16":
            raise BuildError(
                f"FP16 on a strongly typed network (TensorRT {tensorrt_version}) needs an FP16 ONNX "
                "(e.g. ModelOpt AutoCast); this bundle's ONNX is FP32. Build fp32 or int8 instead"
            )
        network_flags.append("STRONGLY_TYPED")
    else:
        if precision == "fp16":
            builder_flags.append("FP16")
        elif precision == "int8":
            # FP16 as well: layers left in float (fallback nodes, unsupported ops) may run in FP16.
            builder_flags += ["INT8", "FP16"]
    return BuildPlan(
        precision=precision,
        int8_mode=mode,
        source_key=key,
        source_file=art.file,
        network_flags=tuple(network_flags),
        builder_flags=tuple(builder_flags),
        input_name=manifest.input.name,
        input_chw=input_shape(manifest.input, input_kind),
        batch=(lo, hi),
        opt_batch=opt,
        calib_batch=int(calib_batch),
        tensorrt_version=str(tensorrt_version),
        notes=tuple(notes),
        input_kind=input_kind,
        dla_core=dla_core,
    )


def default_timing_cache(platform: Platform) -> Path:
    """Per TensorRT version and GPU: timing caches do not transfer between them."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "defectscope" / "tensorrt"
    name = f"timing-trt{slug(platform.tensorrt_version)}-{slug(platform.gpu)}-sm{platform.compute_capability}.cache"
    return base / name


def engine_file_name(key: str, precision: str) -> str:
    return f"engines/model.{precision}.engine" if key == f"trt-{precision}" else f"engines/{slug(key)}.engine"


def calibration_cache_name(tensorrt_version: str) -> str:
    """Where a bundle keeps the TensorRT calibration cache (one per TensorRT version)."""
    return f"engines/calibration-trt{slug(tensorrt_version)}.cache"
