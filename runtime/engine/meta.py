"""TensorRT engine metadata and the "built for another TensorRT / GPU" refusal.

A serialized TensorRT engine only runs under the TensorRT version that built it
and on the GPU type it was tuned for. ``build-engine`` (calibration/) records the
build platform in the bundle's artifact; the runtime's TensorRT backend calls
:func:`check_engine` before deserializing, and refuses a mismatch with a message
that says what differs and the command that rebuilds the engine on this device.

Pure functions except :func:`current_platform`, which imports TensorRT and a CUDA
binding lazily. No torch, no calibration imports (runtime must stay light).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class EngineUnavailableError(RuntimeError):
    """TensorRT or a CUDA GPU is not usable on this machine; the message says which and why."""


class EngineMismatchError(RuntimeError):
    """An engine built for another TensorRT version / GPU; the message holds the rebuild command."""


@dataclass(frozen=True)
class Platform:
    """Where an engine is built or about to run."""

    tensorrt_version: str  # e.g. "10.3.0.26"
    gpu: str  # e.g. "Orin", "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "major.minor", e.g. "8.7"
    l4t: str | None = None  # Jetson: the L4T release of /etc/nv_tegra_release, e.g. "36.3.0"; None elsewhere

    def to_dict(self) -> dict[str, str]:
        out = {
            "tensorrt_version": self.tensorrt_version,
            "gpu": self.gpu,
            "compute_capability": self.compute_capability,
        }
        if self.l4t:
            out["l4t"] = self.l4t
        return out


TEGRA_RELEASE = "/etc/nv_tegra_release"
# L4T release (major.minor) -> the JetPack it ships in (for messages; the check compares L4T itself).
JETPACK = {
    "32.7": "4.6.x",
    "35.1": "5.0.2",
    "35.2": "5.1",
    "35.3": "5.1.1",
    "35.4": "5.1.2",
    "35.5": "5.1.3",
    "35.6": "5.1.4",
    "36.2": "6.0 DP",
    "36.3": "6.0",
    "36.4": "6.1/6.2",
}


def parse_l4t(text: str) -> str | None:
    """ "# R36 (release), REVISION: 3.0, GCID: ..." (/etc/nv_tegra_release) -> "36.3.0"; None if not that format."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}"


def read_l4t(path: str = TEGRA_RELEASE) -> str | None:
    """This machine's L4T release, or None (not a Jetson, or the file is unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return parse_l4t(fh.read(4096))
    except OSError:
        return None


def jetpack_of(l4t: str | None) -> str | None:
    """The JetPack release of an L4T version ("36.3.0" -> "6.0"), None when unknown."""
    if not l4t:
        return None
    return JETPACK.get(".".join(l4t.split(".")[:2]))


def describe_l4t(l4t: str | None) -> str:
    if not l4t:
        return "not a Jetson (no L4T)"
    jp = jetpack_of(l4t)
    return f"L4T {l4t}" + (f" (JetPack {jp})" if jp else "")


def version_tuple(version: str | None) -> tuple[int, ...]:
    """ "10.3.0.26" -> (10, 3, 0, 26); non-numeric parts end the tuple."""
    out: list[int] = []
    for part in str(version or "").split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def same_engine_version(built: str | None, running: str | None) -> bool:
    """Serialized engines are tied to major.minor.patch (the build number may differ)."""
    b, r = version_tuple(built), version_tuple(running)
    return len(b) >= 3 and len(r) >= 3 and b[:3] == r[:3]


def rebuild_command(bundle_path: str, key: str, artifact: Any) -> str:
    """The ``defectscope build-engine`` command that rebuilds ``artifact`` with the same options."""
    extra = dict(getattr(artifact, "extra", {}) or {})
    build = dict(extra.get("build", {}) or {})
    precision = build.get("precision") or getattr(artifact, "precision", "fp16")
    cmd = ["defectscope", "build-engine", str(bundle_path), "--precision", str(precision)]
    if build.get("input") == "uint8_nhwc":
        cmd += ["--input", "uint8"]
    dla = extra.get("dla") or {}
    if isinstance(dla, Mapping) and dla.get("requested") is not None:
        cmd += ["--dla-core", str(dla["requested"])]
    batch = getattr(artifact, "batch", None) or build.get("batch")
    if batch:
        cmd += ["--batch", str(batch[0]), str(batch[1])]
    if build.get("opt_batch"):
        cmd += ["--opt-batch", str(build["opt_batch"])]
    if precision == "int8" and build.get("int8_mode"):
        cmd += ["--int8-mode", str(build["int8_mode"])]
    default_key = f"trt-{precision}"
    if key != default_key:
        cmd += ["--key", key]
    return shlex.join(cmd)


def engine_problems(artifact: Any, platform: Platform, strict_gpu: bool = True) -> list[str]:
    """What keeps ``artifact`` (a bundle Artifact of format tensorrt) from running on ``platform``.

    Empty list: compatible. The TensorRT version must match in major.minor.patch
    (engines built with ``version_compatible`` may run on a newer release of the
    same major); the compute capability must match; with ``strict_gpu`` the GPU
    name must match too (TensorRT tunes tactics per GPU model and warns, or
    fails, when an engine moves between models).
    """
    problems: list[str] = []
    extra = dict(getattr(artifact, "extra", {}) or {})
    built_trt = getattr(artifact, "tensorrt_version", None)
    if not built_trt:
        problems.append("the artifact does not record the TensorRT version it was built with")
    elif not same_engine_version(built_trt, platform.tensorrt_version):
        b, r = version_tuple(built_trt), version_tuple(platform.tensorrt_version)
        if not (extra.get("version_compatible") and b[:1] == r[:1] and r[:3] >= b[:3]):
            problems.append(f"built with TensorRT {built_trt}, this device has TensorRT {platform.tensorrt_version}")
    built_cc = getattr(artifact, "compute_capability", None)
    if not built_cc:
        problems.append("the artifact does not record the GPU compute capability it was built for")
    elif str(built_cc) != str(platform.compute_capability):
        problems.append(
            f"built for compute capability {built_cc} ({getattr(artifact, 'gpu', '?')}), "
            f"this GPU is {platform.compute_capability} ({platform.gpu})"
        )
    elif strict_gpu and getattr(artifact, "gpu", None) and artifact.gpu != platform.gpu:
        problems.append(f"built on GPU {artifact.gpu!r}, this device has {platform.gpu!r}")
    built_l4t = extra.get("l4t")
    # Jetson engines are tied to the BSP too (TensorRT, cuDNN and the DLA firmware ship with JetPack);
    # engines from before this record (no "l4t") are judged by TensorRT version and GPU alone.
    if built_l4t and str(built_l4t) != str(platform.l4t or ""):
        problems.append(f"built on {describe_l4t(str(built_l4t))}, this device runs {describe_l4t(platform.l4t)}")
    return problems


def check_engine(artifact: Any, platform: Platform, bundle_path: str, key: str, strict_gpu: bool = True) -> None:
    """Raise EngineMismatchError (what differs + the rebuild command) unless the engine fits ``platform``."""
    problems = engine_problems(artifact, platform, strict_gpu=strict_gpu)
    if problems:
        file = getattr(artifact, "file", "?")
        raise EngineMismatchError(
            f"{bundle_path}/{file}: TensorRT engine '{key}' cannot run here: "
            + "; ".join(problems)
            + f". Rebuild it on this device with:\n    {rebuild_command(bundle_path, key, artifact)}"
        )


def check_engine_io(
    inputs: Sequence[tuple[str, Sequence[int]]],
    outputs: Sequence[tuple[str, Sequence[int]]],
    input_name: str,
    input_chw: Sequence[int],  # the per-image input shape: (C,H,W), or (H,W,C) for a uint8-input engine
    output_names: Sequence[str],
    num_classes: int | None,
    where: str,
) -> None:
    """Compare an engine's I/O tensors (name, dims with -1 for dynamic) with the manifest; ValueError on mismatch."""
    if [n for n, _ in inputs] != [input_name]:
        raise ValueError(f"{where}: engine inputs {[n for n, _ in inputs]}, manifest expects [{input_name!r}]")
    dims = list(inputs[0][1])
    if len(dims) != 4 or [int(d) for d in dims[1:]] != [int(d) for d in input_chw]:
        raise ValueError(f"{where}: engine input shape {dims}, manifest expects (N,{','.join(map(str, input_chw))})")
    names = [n for n, _ in outputs]
    if names != list(output_names):
        raise ValueError(f"{where}: engine outputs {names}, manifest expects {list(output_names)}")
    if num_classes is not None:
        odims = list(outputs[0][1])
        if len(odims) != 2 or (odims[1] != -1 and int(odims[1]) != num_classes):
            raise ValueError(f"{where}: engine output shape {odims}, expected (N, {num_classes})")


def _cuda_device_info() -> tuple[str, str]:
    """(GPU name, "major.minor") of CUDA device 0 via pycuda, cuda-python or nvidia-smi."""
    errors: list[str] = []
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            raise EngineUnavailableError("no CUDA device found (pycuda sees 0 devices)")
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        return dev.name(), f"{major}.{minor}"
    except EngineUnavailableError:
        raise
    except Exception as exc:  # ImportError, or a driver error: try the next binding
        errors.append(f"pycuda: {exc}")
    try:
        from cuda import cudart

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) != 0:
            raise RuntimeError(f"cudaGetDeviceProperties failed: {err}")
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return name.strip("\x00 "), f"{props.major}.{props.minor}"
    except Exception as exc:
        errors.append(f"cuda-python: {exc}")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            name, cc = [s.strip() for s in out.splitlines()[0].split(",")]
            return name, cc
        except Exception as exc:
            errors.append(f"nvidia-smi: {exc}")
    raise EngineUnavailableError("cannot query the CUDA GPU (" + "; ".join(errors) + ")")


def current_platform() -> Platform:
    """TensorRT version + GPU of this machine; EngineUnavailableError (with the reason) when absent."""
    try:
        import tensorrt as trt
    except Exception as exc:
        raise EngineUnavailableError(
            f"TensorRT is not importable here ({type(exc).__name__}: {exc}); TensorRT engines are built and "
            "run on the NVIDIA device (Jetson: JetPack ships it; x86: pip install tensorrt)"
        ) from None
    name, cc = _cuda_device_info()
    return Platform(tensorrt_version=str(trt.__version__), gpu=name, compute_capability=cc, l4t=read_l4t())


def platform_from_mapping(data: Mapping[str, Any]) -> Platform:
    """Platform from a dict with tensorrt_version / gpu / compute_capability (e.g. an artifact dict)."""
    l4t = data.get("l4t")
    return Platform(
        str(data["tensorrt_version"]), str(data["gpu"]), str(data["compute_capability"]), str(l4t) if l4t else None
    )


def slug(text: str) -> str:
    """File-name-safe form of a GPU name / version for cache file names."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


__all__ = [
    "EngineMismatchError",
    "EngineUnavailableError",
    "Platform",
    "check_engine",
    "check_engine_io",
    "current_platform",
    "describe_l4t",
    "jetpack_of",
    "parse_l4t",
    "read_l4t",
    "engine_problems",
    "platform_from_mapping",
    "rebuild_command",
    "same_engine_version",
    "slug",
    "version_tuple",
]
