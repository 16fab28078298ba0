"""Choosing the inference backend: ONNX Runtime (CPU / CUDA), OpenVINO or TensorRT, registered by name.

``create_backend(bundle, model_cfg)`` picks the artifact and backend: ``auto``
tries a TensorRT engine of the bundle (when tensorrt + pycuda import, a GPU is
present and the engine was built for this TensorRT version and GPU), then ONNX
Runtime with the CUDA provider, then OpenVINO (x86 CPUs, when installed), then
ONNX Runtime on the CPU. Any failure creating a candidate in ``auto`` (including
pycuda MemoryError / LogicError or an API a too-old TensorRT lacks) is recorded
and the next candidate is tried. A backend whose accuracy the bundle recorded as
outside its budget (``defectscope calibrate --gate-backends``) is refused. A
named backend is used or refused, never silently replaced.

The created backend carries ``selection`` (a ``Selection``): which backend, why,
and what was skipped and why; the daemon logs it and shows it on /readyz.

TensorRT, pycuda and openvino are imported only when their backend is created.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.bundle.load import Bundle
from runtime.config.station import ModelConfig
from runtime.inference.backends import Backend, BackendError, OpenVINOBackend, OrtBackend

log = logging.getLogger("defectscope.backends")

FACTORIES: dict[str, Callable[[Bundle, str, ModelConfig], Backend]] = {}


def register(
    name: str,
) -> Callable[[Callable[[Bundle, str, ModelConfig], Backend]], Callable[[Bundle, str, ModelConfig], Backend]]:
    """Register a backend factory under a config name; refuses duplicates."""

    def deco(fn: Callable[[Bundle, str, ModelConfig], Backend]) -> Callable[[Bundle, str, ModelConfig], Backend]:
        if name in FACTORIES:
            raise ValueError(f"backend {name!r} registered twice")
        FACTORIES[name] = fn
        return fn

    return deco


@register("onnxruntime-cpu")
def _ort_cpu(bundle: Bundle, key: str, cfg: ModelConfig) -> Backend:
    return OrtBackend(bundle, key, cuda=False, threads=cfg.threads)


@register("onnxruntime-cuda")
def _ort_cuda(bundle: Bundle, key: str, cfg: ModelConfig) -> Backend:
    return OrtBackend(bundle, key, cuda=True, threads=cfg.threads, device_id=cfg.device_id)


@register("tensorrt")
def _tensorrt(bundle: Bundle, key: str, cfg: ModelConfig) -> Backend:
    from runtime.inference.tensorrt import TensorRTBackend

    return TensorRTBackend(bundle, key, device_id=cfg.device_id, dla_core=cfg.dla_core)


@register("openvino")
def _openvino(bundle: Bundle, key: str, cfg: ModelConfig) -> Backend:
    return OpenVINOBackend(bundle, key, cfg)


X86 = ("x86_64", "amd64", "i386", "i686", "x86")
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "openvino", "onnxruntime-cpu")


@dataclass(frozen=True)
class Selection:
    """Which backend serves, why, and why each earlier candidate did not (the daemon's log and /readyz)."""

    backend: str
    artifact: str
    precision: str  # the artifact's
    inference_precision: str
    requested: str  # [model] backend
    reason: str
    skipped: tuple[str, ...] = ()  # "<backend> (<artifact>): <why not>", in the order tried
    accuracy: Mapping[str, Any] | None = field(default=None)  # the bundle's record for this backend, if any

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "artifact": self.artifact,
            "precision": self.precision,
            "inference_precision": self.inference_precision,
            "requested": self.requested,
            "reason": self.reason,
            "skipped": list(self.skipped),
            "accuracy": dict(self.accuracy) if self.accuracy is not None else None,
        }

    def summary(self) -> str:
        head = (
            f"{self.backend} ({self.artifact}, {self.precision}, inference {self.inference_precision}): {self.reason}"
        )
        return head + ("; skipped: " + "; ".join(self.skipped) if self.skipped else "")


def accuracy_record(bundle: Bundle, key: str, accuracy_id: str | None) -> Mapping[str, Any] | None:
    """The gate record ``calibrate --gate-backends`` wrote for (artifact, backend), or None."""
    if accuracy_id is None:
        return None
    entry = bundle.manifest.metrics.get(key)
    if not isinstance(entry, Mapping):
        return None
    per_backend = entry.get("backends")
    if isinstance(per_backend, Mapping) and isinstance(per_backend.get(accuracy_id), Mapping):
        return per_backend[accuracy_id]
    if accuracy_id == "onnxruntime" and isinstance(entry.get("gate"), Mapping):
        return {"gate": entry["gate"]}  # calibrate's own INT8 gate runs on ONNX Runtime
    return None


def accuracy_refusal(record: Mapping[str, Any] | None) -> str | None:
    """Why a recorded accuracy refuses the backend (outside the budget), or None."""
    gate = record.get("gate") if record is not None else None
    if not isinstance(gate, Mapping) or gate.get("passed", True) is not False:
        return None
    drops = gate.get("drops_points") or {}
    worst = ", ".join(f"{m} -{d:.2f}" for m, d in drops.items() if m in (gate.get("failed") or drops))
    return (
        f"the bundle's accuracy record fails the budget of {gate.get('budget_points')} points "
        f"on split '{gate.get('split')}' ({worst} points vs the FP32 reference); recalibrate or pick another "
        "backend"
    )


def _precheck(name: str) -> str | None:
    """Why ``auto`` skips ``name`` on this machine without trying it, or None."""
    if name == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "no CUDA provider in this onnxruntime build"
    if name == "openvino":
        if platform.machine().lower() not in X86:
            return f"auto uses OpenVINO on x86 CPUs only (this is {platform.machine()})"
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed (pip install 'defectscope[openvino]')"
    return None


def _default_onnx(bundle: Bundle) -> str | None:
    arts = bundle.manifest.artifacts
    default = bundle.manifest.default_artifact
    if arts[default].format == "onnx":
        return default
    for key in ("int8", "fp32", "fp16"):
        if key in arts and arts[key].format == "onnx":
            return key
    return next((k for k, a in arts.items() if a.format == "onnx"), None)


def candidates(bundle: Bundle, cfg: ModelConfig) -> list[tuple[str, str]]:
    """(backend, artifact key) pairs to try, in order; BackendError if none can apply."""
    arts = bundle.manifest.artifacts
    if cfg.artifact is not None and cfg.artifact not in arts:
        raise BackendError(f"[model] artifact {cfg.artifact!r} is not in the bundle; it has {sorted(arts)}")
    trt_keys = [cfg.artifact] if cfg.artifact else [k for k, a in arts.items() if a.format == "tensorrt"]
    trt_keys = [k for k in trt_keys if arts[k].format == "tensorrt"]
    if trt_keys and arts[bundle.manifest.default_artifact].format == "tensorrt":
        trt_keys.sort(key=lambda k: k != bundle.manifest.default_artifact)
    onnx_key = (
        cfg.artifact
        if cfg.artifact and arts[cfg.artifact].format == "onnx"
        else (None if cfg.artifact else _default_onnx(bundle))
    )
    if cfg.backend == "auto":
        out = [("tensorrt", k) for k in trt_keys]
        if onnx_key:
            out += [(name, onnx_key) for name in AUTO_ORDER if name != "tensorrt"]
        if not out:
            raise BackendError("the bundle has no artifact any backend can run")
        return out
    if cfg.backend == "tensorrt":
        if not trt_keys:
            raise BackendError(
                f"[model] backend 'tensorrt' needs a tensorrt artifact; the bundle has "
                f"{ {k: a.format for k, a in arts.items()} } (defectscope build-engine makes one)"
            )
        return [("tensorrt", trt_keys[0])]
    if not onnx_key:
        has = f"{cfg.artifact!r} is {arts[cfg.artifact].format}" if cfg.artifact else "the bundle has none"
        raise BackendError(f"[model] backend {cfg.backend!r} needs an onnx artifact; {has}")
    return [(cfg.backend, onnx_key)]


def create_backend(bundle: Bundle, cfg: ModelConfig, probe: Callable[[Backend], None] | None = None) -> Backend:
    """The first usable backend for the bundle per ``cfg.backend`` (see module doc); sets ``.selection``.

    ``probe`` (e.g. the daemon's warm-up) runs on each created candidate; an exception from it
    counts as that candidate failing (auto: closed, next one tried; named: BackendError).
    """
    auto = cfg.backend == "auto"
    skipped: list[str] = []
    for name, key in candidates(bundle, cfg):
        why = _precheck(name) if auto else None
        if why is None:
            backend, why = _try(name, key, bundle, cfg, auto, probe)
            if backend is not None:
                reason = (
                    "named in [model] backend" if not auto else "first usable in auto order " + " > ".join(AUTO_ORDER)
                )
                backend.selection = Selection(
                    backend.name,
                    key,
                    backend.precision,
                    backend.inference_precision,
                    cfg.backend,
                    reason,
                    tuple(skipped),
                    accuracy_record(bundle, key, backend.accuracy_id),
                )
                log.info("backend: %s", backend.selection.summary())
                return backend
        skipped.append(f"{name} ({key}): {why}")
        log.info("backend %s for artifact %s not usable: %s", name, key, why)
    raise BackendError("no usable backend: " + "; ".join(skipped))


def _try(
    name: str, key: str, bundle: Bundle, cfg: ModelConfig, auto: bool, probe: Callable[[Backend], None] | None
) -> tuple[Backend | None, str]:
    """(backend, "") or, in auto mode, (None, why not); a named backend raises BackendError instead."""
    backend = None
    try:
        backend = FACTORIES[name](bundle, key, cfg)
        refusal = accuracy_refusal(accuracy_record(bundle, key, backend.accuracy_id))
        if refusal is not None:
            log.warning("backend %s (%s, %s) refused: %s", name, key, backend.accuracy_id, refusal)
            raise BackendError(f"{name} ({key}): {refusal}" if not auto else f"refused: {refusal}")
        if probe is not None:
            probe(backend)
        return backend, ""
    except BackendError as exc:
        if backend is not None:
            backend.close()
        if not auto:
            raise
        return None, str(exc)
    except Exception as exc:  # pycuda MemoryError / LogicError, a TensorRT without the API used, ...
        if backend is not None:
            backend.close()
        why = f"{type(exc).__name__}: {exc}"
        log.warning("creating backend %s for artifact %s failed: %s", name, key, why)
        if not auto:
            raise BackendError(f"{name} ({key}) could not be created: {why}") from None
        return None, f"creation failed: {why}"
