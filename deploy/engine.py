"""``deploy build-engine``: what ``defectscope-engine@<station>.service`` runs.

Resolves the bundle the station serves, skips it when it already holds a TensorRT
engine for the TensorRT version installed here, else runs ``defectscope
build-engine <bundle>`` (the calibration package's command, as a subprocess: deploy
never imports calibration) and optionally reloads the station's daemon.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.config import DeployConfig, DeployError, read_station, rooted
from deploy.service import run_reload


@dataclass(frozen=True)
class EngineResult:
    bundle: Path
    built: bool
    reason: str


def installed_tensorrt_version() -> str | None:
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-libs", "tensorrt_cu12"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:  # JetPack ships TensorRT's Python bindings without pip metadata.
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        return None


def build_for_station(
    root: Path, cfg: DeployConfig, station_config: Path, force: bool = False, reload: bool = False,
    build_args: str = "",
) -> EngineResult:
    from runtime.bundle import BundleError, load_bundle

    station = read_station(Path(station_config))
    bundle_path = rooted(root, station.bundle)
    try:
        bundle = load_bundle(bundle_path, verify=True, check_graph=False)
    except BundleError as exc:
        raise DeployError(f"station {station.name}: cannot build an engine: {exc}") from None
    trt = installed_tensorrt_version()
    if trt is None:
        raise DeployError(
            "TensorRT is not importable here; install it (JetPack, or pip install 'defectscope[tensorrt]') "
            "to build engines. The station keeps serving ONNX meanwhile."
        )
    for key, art in bundle.manifest.artifacts.items():
        if art.format == "tensorrt" and art.tensorrt_version == trt and (bundle.path / art.file).is_file() and not force:
            return EngineResult(bundle.path, False, f"{bundle.path} already has engine {key!r} for TensorRT {trt}")
    argv = [sys.executable, "-m", "defectscope.cli", "build-engine", str(bundle.path), *shlex.split(build_args)]
    proc = subprocess.run(argv)
    if proc.returncode != 0:
        raise DeployError(f"{' '.join(argv)} exited {proc.returncode}")
    if reload:
        run_reload(cfg, station)
    return EngineResult(bundle.path, True, f"built a TensorRT {trt} engine into {bundle.path}")
