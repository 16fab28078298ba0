"""``defectscope doctor``: what this station's Python environment has, and which features that enables.

Reports the Python, OS / Jetson release, OpenCV (version, where it comes from, its GStreamer / FFmpeg /
CUDA build flags), ONNX Runtime providers, OpenVINO, TensorRT / pycuda, the CUDA device (driver API
via ctypes, so no CUDA Python package is needed) and PyGObject / GStreamer with the elements the
camera pipelines use. Each probe is isolated: a broken package is reported, never a traceback.
On a Jetson it warns when the pip OpenCV wheel shadows JetPack's GStreamer-enabled build.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

# Elements the documented pipelines use: appsink (every pipeline), rtspsrc + depay/parse (RTSP),
# nvv4l2decoder / nvvidconv (Jetson NVDEC + colour conversion), nvarguscamerasrc (CSI), avdec_h264
# (software decode where NVDEC is absent).
GST_ELEMENTS = (
    "appsink",
    "videoconvert",
    "rtspsrc",
    "rtph264depay",
    "h264parse",
    "nvv4l2decoder",
    "nvvidconv",
    "nvarguscamerasrc",
    "avdec_h264",
)
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _probe(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # a broken optional package is a finding, not a crash
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}


def system() -> dict[str, Any]:
    os_name = None
    if Path("/etc/os-release").is_file():
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    tegra = TEGRA_RELEASE.read_text().splitlines()[0].strip() if TEGRA_RELEASE.is_file() else None
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "machine": platform.machine(),
        "os": os_name or platform.platform(),
        "jetson_l4t": tegra,  # e.g. "# R36 (release), REVISION: 4.0, ..." (JetPack 6.1 = L4T 36.4)
        "venv_system_site_packages": _system_site_packages(),
    }


def _system_site_packages() -> bool | None:
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    if sys.prefix == sys.base_prefix or not cfg.is_file():
        return None  # not a venv
    return "include-system-site-packages = true" in cfg.read_text().replace("\t", " ").lower()


def opencv() -> dict[str, Any]:
    import cv2

    from runtime.sources.gstreamer import opencv_build_flag

    wheels = {d: v for d in ("opencv-python-headless", "opencv-python", "opencv-contrib-python") if (v := _version(d))}
    return {
        "available": True,
        "version": cv2.__version__,
        "path": str(Path(cv2.__file__).parent),
        "pip_wheels": wheels,  # empty: a system build (JetPack's python3-opencv)
        "gstreamer": opencv_build_flag("GStreamer"),
        "ffmpeg": opencv_build_flag("FFMPEG"),
        "cuda": opencv_build_flag("NVIDIA CUDA"),
    }


def onnxruntime() -> dict[str, Any]:
    ort = importlib.import_module("onnxruntime")
    return {"available": True, "version": ort.__version__, "providers": list(ort.get_available_providers())}


def openvino() -> dict[str, Any]:
    if importlib.util.find_spec("openvino") is None:
        return {"available": False}
    ov = importlib.import_module("openvino")
    return {"available": True, "version": ov.get_version(), "devices": list(ov.Core().available_devices)}


def tensorrt() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("tensorrt", "pycuda"):
        if importlib.util.find_spec(name) is None:
            out[name] = None
            continue
        mod = importlib.import_module(name)
        out[name] = getattr(mod, "__version__", None) or getattr(mod, "VERSION_TEXT", None) or "unknown"
    out["available"] = all(out[n] for n in ("tensorrt", "pycuda"))
    return out


def cuda_device() -> dict[str, Any]:
    """CUDA driver API through ctypes (libcuda ships with the driver / JetPack), device 0 .. n-1."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return {"available": False, "why": "no libcuda.so.1 (no NVIDIA driver)"}
    if (rc := lib.cuInit(0)) != 0:
        return {"available": False, "why": f"cuInit failed (CUresult {rc})"}
    count, version = ctypes.c_int(), ctypes.c_int()
    lib.cuDeviceGetCount(ctypes.byref(count))
    lib.cuDriverGetVersion(ctypes.byref(version))
    devices = []
    for i in range(count.value):
        dev, name = ctypes.c_int(), ctypes.create_string_buffer(256)
        lib.cuDeviceGet(ctypes.byref(dev), i)
        lib.cuDeviceGetName(name, 256, dev)
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
        devices.append(
            {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}
        )
    v = version.value
    return {"available": bool(devices), "driver_cuda": f"{v // 1000}.{v % 1000 // 10}", "devices": devices}


def gstreamer() -> dict[str, Any]:
    from runtime.sources.gstreamer import pygobject_problem

    if why := pygobject_problem():
        return {"available": False, "why": why}
    from gi.repository import Gst

    return {
        "available": True,
        "version": Gst.version_string(),
        "elements": {e: Gst.ElementFactory.find(e) is not None for e in GST_ELEMENTS},
    }


def report() -> dict[str, Any]:
    out: dict[str, Any] = {
        "system": _probe(system),
        "opencv": _probe(opencv),
        "onnxruntime": _probe(onnxruntime),
        "openvino": _probe(openvino),
        "tensorrt": _probe(tensorrt),
        "cuda": _probe(cuda_device),
        "gstreamer": _probe(gstreamer),
    }
    out["features"] = features(out)
    out["warnings"] = warnings(out)
    return out


def features(r: dict[str, Any]) -> dict[str, str]:
    """Station feature -> how it runs here, or "no (<what is missing>)"."""
    cv, ort, gst, trt = r["opencv"], r["onnxruntime"], r["gstreamer"], r["tensorrt"]
    providers = ort.get("providers", [])
    cv_gst = str(cv.get("gstreamer", "")).upper().startswith("YES")
    elements = gst.get("elements", {})
    reader = "PyGObject" if gst.get("available") else "OpenCV CAP_GSTREAMER" if cv_gst else None
    out = {
        "onnxruntime-cpu backend": "yes" if "CPUExecutionProvider" in providers else "no (onnxruntime)",
        "onnxruntime-cuda backend": "yes" if "CUDAExecutionProvider" in providers else "no (onnxruntime-gpu build)",
        "tensorrt backend": "yes"
        if trt.get("available") and r["cuda"].get("available")
        else "no (tensorrt + pycuda + a CUDA device)",
        "openvino backend": "yes" if r["openvino"].get("available") else "no (pip install 'defectscope[openvino]')",
        "rtsp/http via FFmpeg": "yes" if str(cv.get("ffmpeg", "")).upper().startswith("YES") else "no (OpenCV FFmpeg)",
        "gstreamer cameras": f"yes ({reader})" if reader else "no (PyGObject or an OpenCV built with GStreamer)",
    }
    hw = reader and (gst.get("available") and elements.get("nvv4l2decoder") and elements.get("nvvidconv"))
    out["rtsp hardware decode (nvv4l2decoder)"] = "yes" if hw else "no (JetPack's GStreamer + PyGObject)"
    csi = reader and gst.get("available") and elements.get("nvarguscamerasrc")
    out["jetson csi camera (nvarguscamerasrc)"] = "yes" if csi else "no (JetPack's GStreamer + PyGObject)"
    return out


def warnings(r: dict[str, Any]) -> list[str]:
    out = []
    cv = r["opencv"]
    if r["system"].get("jetson_l4t") and cv.get("pip_wheels"):
        out.append(
            f"pip OpenCV {cv['pip_wheels']} shadows JetPack's OpenCV (GStreamer {cv.get('gstreamer')}): "
            "pip uninstall those wheels in this venv (README 'Jetson stations')"
        )
    if r["system"].get("jetson_l4t") and r["system"].get("venv_system_site_packages") is False:
        out.append(
            "this venv hides the system site-packages (JetPack's tensorrt, pycuda, cv2, gi): "
            "recreate it with --system-site-packages"
        )
    return out


def _text(r: dict[str, Any]) -> str:
    lines = []
    for section in ("system", "opencv", "onnxruntime", "openvino", "tensorrt", "cuda", "gstreamer"):
        lines.append(f"{section}:")
        for k, v in r[section].items():
            if isinstance(v, dict):
                v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
            elif isinstance(v, list):
                v = ", ".join(json.dumps(x) if isinstance(x, dict) else str(x) for x in v) or "-"
            lines.append(f"  {k:26} {v}")
    lines.append("features:")
    lines += [f"  {k:38} {v}" for k, v in r["features"].items()]
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="defectscope doctor",
        description="Report what this station's environment has (Python, OpenCV build flags, ONNX Runtime "
        "providers, OpenVINO, TensorRT/pycuda, CUDA device, PyGObject/GStreamer elements) and which "
        "station features that enables. Exit 0; 1 with --strict when there are warnings.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when the report has warnings")
    args = p.parse_args(argv)
    os.environ.setdefault("GST_DEBUG", "0")
    r = report()
    print(json.dumps(r, indent=2) if args.json else _text(r))
    return 1 if args.strict and r["warnings"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
