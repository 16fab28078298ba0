"""``deploy build-engine``: what ``defectscope-engine@<station>.service`` runs.

Resolves the bundle the station serves and asks ``runtime.engine_build.fresh_engine`` —
the runtime's own test (TensorRT version, GPU, compute capability) — whether an engine
there already fits this device. Otherwise runs ``defectscope build-engine <bundle>`` (as a
subprocess: the build, and the INT8 accuracy gate on the bundle's held-out sample, are
the station's build step) and optionally reloads the station's daemon.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.config import DeployConfig, DeployError, read_station, rooted
from deploy.service import run_reload
from runtime.engine_meta import EngineUnavailableError, Platform, current_platform


@dataclass(frozen=True)
class EngineResult:
    bundle: Path
    built: bool
    reason: str


def _platform() -> Platform:
    try:
        return current_platform()
    except EngineUnavailableError as exc:
        raise DeployError(f"{exc}. The station keeps serving ONNX meanwhile.") from None


def build_for_station(
    root: Path, cfg: DeployConfig, station_config: Path, force: bool = False, reload: bool = False,
    build_args: str = "", timing_cache: Path | None = None,
) -> EngineResult:
    from runtime.bundle import BundleError, load_bundle
    from runtime.engine_build import fresh_engine

    station = read_station(Path(station_config))
    bundle_path = rooted(root, station.bundle)
    try:
        bundle = load_bundle(bundle_path, verify=True, check_graph=False)
    except BundleError as exc:
        raise DeployError(f"station {station.name}: cannot build an engine: {exc}") from None
    platform = _platform()
    key, stale = fresh_engine(bundle.manifest, bundle.path, platform)
    if key is not None and not force:
        return EngineResult(bundle.path, False, f"{bundle.path} already has engine {key!r} for TensorRT "
                                                f"{platform.tensorrt_version} on {platform.gpu} (sm {platform.compute_capability})")
    argv = [sys.executable, "-m", "defectscope.cli", "build-engine", str(bundle.path)]
    if timing_cache is not None:
        argv += ["--timing-cache", str(timing_cache)]
    argv += shlex.split(build_args)
    proc = subprocess.run(argv)
    if proc.returncode != 0:
        raise DeployError(f"{' '.join(argv)} exited {proc.returncode}; the station keeps serving what it has")
    if reload:
        run_reload(cfg, station)
    why = f" (replacing: {'; '.join(stale)})" if stale else ""
    return EngineResult(bundle.path, True, f"built a TensorRT {platform.tensorrt_version} engine into {bundle.path}{why}")
