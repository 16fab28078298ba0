"""Building TensorRT engines from a bundle's ONNX models, on the station (station code: no torch).

Lives beside ``runtime.engine.meta`` (what an engine records and when it fits a device):
``deploy build-engine`` and ``defectscope build-engine`` both decide freshness with
:func:`fresh_engine`, which applies the runtime's own check (TensorRT version, GPU,
compute capability), and INT8 engines pass :mod:`runtime.engine.gate` before they are kept.

:func:`runtime.engine.plan.plan_build` decides everything (which ONNX, network/builder flags,
optimisation profile, INT8 mode) from the manifest and the TensorRT version; it
is pure and tested on CPU. :func:`build_engine` executes a plan with TensorRT
(imported lazily) and returns the serialized engine with its platform.

TensorRT generations:
- 8.x: explicit-batch networks need ``EXPLICIT_BATCH``; INT8 by default through
  the entropy calibrator on the FP32 ONNX (implicit quantization), or from the
  QDQ ONNX when asked (``--int8-mode explicit``).
- 10.x: ``EXPLICIT_BATCH`` is deprecated (always on); INT8 from the symmetric
  QDQ ONNX (explicit quantization). Weakly typed by default with INT8+FP16 flags
  so float-kept layers may run in FP16; ``--strongly-typed`` follows the graph's
  types instead. Calibrators still exist but are deprecated.
- 11+: precision flags are gone, networks are strongly typed: FP32, or INT8 from
  the QDQ ONNX.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.engine.dla import configure_dla
from runtime.engine.meta import (
    Platform,
    check_engine_io,
    current_platform,
    engine_problems,
    jetpack_of,
    version_tuple,
)
from runtime.engine.plan import BuildPlan
from runtime.engine.source import BuildError
from runtime.fsio import atomic_write_bytes


@dataclass
class BuildResult:
    engine: bytes
    platform: Platform
    seconds: float
    inputs: list[tuple[str, list[int]]] = field(default_factory=list)
    outputs: list[tuple[str, list[int]]] = field(default_factory=list)
    timing_cache: Path | None = None
    calibration_cache: Path | None = None
    dla: dict[str, Any] = field(default_factory=dict)  # dla_decision + the GPU-fallback layers (empty: GPU build)


def _engine_io(trt: Any, engine: Any) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    inputs: list[tuple[str, list[int]]] = []
    outputs: list[tuple[str, list[int]]] = []
    if hasattr(engine, "num_io_tensors"):  # TensorRT >= 8.5
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dims = [int(d) for d in engine.get_tensor_shape(name)]
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append((name, dims))
    else:  # TensorRT 8.0-8.4 bindings API
        for i in range(engine.num_bindings):
            name = engine.get_binding_name(i)
            dims = [int(d) for d in engine.get_binding_shape(i)]
            (inputs if engine.binding_is_input(i) else outputs).append((name, dims))
    return inputs, outputs


def build_engine(
    plan: BuildPlan,
    onnx_path: str | os.PathLike[str],
    manifest: Any,
    *,
    calibration: Any = None,
    calibration_cache: Any = None,
    timing_cache: Path | None = None,
    workspace_mib: int = 2048,
    verbose: bool = False,
    log: Callable[[str], None] = print,
    make_calibrator: Callable[[Any, Any], Any] | None = None,
) -> BuildResult:
    """Run ``plan`` with TensorRT: parse, configure, build, deserialize and check I/O.

    ``calibration`` is a :class:`calibration.calibrator.BatchStream` (implicit INT8),
    ``calibration_cache`` a :class:`calibration.calibrator.CacheFile` and ``make_calibrator``
    builds the TensorRT calibrator from them (passed in: runtime never imports calibration).
    """
    try:
        import tensorrt as trt
    except Exception as exc:
        raise BuildError(
            f"TensorRT is not importable on this machine ({exc}); run build-engine on the device"
        ) from None
    platform = current_platform()
    if version_tuple(platform.tensorrt_version)[:3] != version_tuple(plan.tensorrt_version)[:3]:
        raise BuildError(
            f"plan made for TensorRT {plan.tensorrt_version}, this machine has {platform.tensorrt_version}"
        )
    started = time.monotonic()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is None:
            if name == "STRONGLY_TYPED":
                continue  # no flag any more: every network is strongly typed (TensorRT 11+)
            raise BuildError(f"this TensorRT ({trt.__version__}) has no network flag {name}")
        flags |= 1 << int(flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  {errors}")

    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    else:  # TensorRT < 8.4
        config.max_workspace_size = int(workspace_mib) << 20
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if "FP16" in plan.builder_flags and not getattr(builder, "platform_has_fast_fp16", True):
        log("warning: this GPU has no fast FP16; the engine may not be faster than FP32")

    dla = configure_dla(trt, builder, network, config, plan, log)

    lo, opt, hi = plan.profile()
    profile = builder.create_optimization_profile()
    profile.set_shape(plan.input_name, lo, opt, hi)
    config.add_optimization_profile(profile)

    if plan.int8_mode == "implicit":
        if make_calibrator is None:
            raise BuildError(
                "implicit INT8 needs an entropy calibrator (calibration.calibrator.make_entropy_calibrator)"
            )
        if calibration is None and (calibration_cache is None or calibration_cache.read() is None):
            raise BuildError("implicit INT8 needs calibration data (--calibration-data) or a valid calibration cache")
        shape = plan.calibration_shape()
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(plan.input_name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
        config.int8_calibrator = make_calibrator(calibration, calibration_cache)

    cache_obj = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache_obj = config.create_timing_cache(data)
        if not config.set_timing_cache(cache_obj, ignore_mismatch=False):
            log(f"timing cache {timing_cache} does not match this device; starting a fresh one")
            cache_obj = config.create_timing_cache(b"")
            config.set_timing_cache(cache_obj, ignore_mismatch=True)
        log(f"timing cache: {timing_cache} ({len(data)} bytes read)")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT failed to build the engine (run with --verbose for the builder log)")
    engine_bytes = bytes(serialized)

    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))

    runtime = trt.Runtime(logger)
    if dla.get("core") is not None:
        runtime.DLA_core = int(dla["core"])  # a DLA engine deserializes onto a DLA core
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BuildError("the freshly built engine does not deserialize")
    inputs, outputs = _engine_io(trt, engine)
    num_classes = len(manifest.classes) if manifest.model.task == "classification" else None
    try:
        check_engine_io(
            inputs,
            outputs,
            manifest.input.name,
            plan.input_shape,
            manifest.output.names,
            num_classes,
            where="built engine",
        )
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    return BuildResult(
        engine=engine_bytes,
        platform=platform,
        seconds=time.monotonic() - started,
        inputs=inputs,
        outputs=outputs,
        timing_cache=timing_cache,
        calibration_cache=getattr(calibration_cache, "path", None),
        dla=dla,
    )


def artifact_fields(
    plan: BuildPlan,
    platform: Platform,
    seconds: float,
    workspace_mib: int,
    calibration: Mapping[str, Any] | None = None,
    dla: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Extra keys recorded on the engine's bundle Artifact (besides version / GPU / batch)."""
    build: dict[str, Any] = {
        "input": plan.input_kind,
        "precision": plan.precision,
        "int8_mode": plan.int8_mode,
        "batch": list(plan.batch),
        "opt_batch": plan.opt_batch,
        "source_artifact": plan.source_key,
        "network_flags": list(plan.network_flags),
        "builder_flags": list(plan.builder_flags),
        "workspace_mib": int(workspace_mib),
        "seconds": round(seconds, 1),
    }
    if calibration:
        build["calibration"] = dict(calibration)
    out: dict[str, Any] = {"build": build, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if platform.l4t:
        # Jetson: engines are per JetPack (TensorRT, cuDNN, DLA firmware); runtime.engine.meta refuses others.
        out["l4t"] = platform.l4t
        out["jetpack"] = jetpack_of(platform.l4t)
    if dla:
        out["dla"] = dict(dla)
    return out


def fresh_engine(manifest: Any, bundle_path: Path, platform: Platform) -> tuple[str | None, list[str]]:
    """(key of a TensorRT artifact that runs on ``platform`` as is, or None; why each other one does not).

    The same test the runtime applies before deserializing (``engine_meta.engine_problems``):
    TensorRT version, compute capability and GPU model; a listed engine file must exist.
    """
    stale = []
    for key, art in manifest.artifacts.items():
        if art.format != "tensorrt":
            continue
        if not (Path(bundle_path) / art.file).is_file():
            stale.append(f"{key}: {art.file} is missing")
            continue
        problems = engine_problems(art, platform)
        if not problems:
            return key, stale
        stale.append(f"{key}: " + "; ".join(problems))
    return None, stale
