"""``deploy build-engine``: what ``defectscope-engine@<station>.service`` runs.

Resolves the bundle the station serves and asks ``runtime.engine.build.fresh_engine`` —
the runtime's own test (TensorRT version, GPU, compute capability) — whether an engine
there already fits this device. Otherwise runs ``defectscope build-engine <bundle>`` (as a
subprocess: the build, and the INT8 accuracy gate on the bundle's held-out sample, are
the station's build step) and optionally reloads the station's daemon.

For a bundle in the model store the build writes a new tree (``--out`` under
``<models_dir>/.builds/``), adopted under the store lock by ``ModelStore.replace_version``:
the tree ``current`` names is never rewritten in place, so a kill at any step of the
write leaves the station on a complete version.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from deploy.config import DeployConfig, DeployError, read_station, rooted
from deploy.service import run_reload
from deploy.store import BUILDS, CURRENT, ModelStore
from runtime.engine.meta import EngineUnavailableError, Platform, current_platform


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
    root: Path,
    cfg: DeployConfig,
    station_config: Path,
    force: bool = False,
    reload: bool = False,
    build_args: str = "",
    timing_cache: Path | None = None,
) -> EngineResult:
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import BundleError
    from runtime.engine.build import fresh_engine

    station = read_station(Path(station_config))
    bundle_path = rooted(root, station.bundle)
    try:
        bundle = load_bundle(bundle_path, verify=True, check_graph=False)
    except BundleError as exc:
        raise DeployError(f"station {station.name}: cannot build an engine: {exc}") from None
    platform = _platform()
    key, stale = fresh_engine(bundle.manifest, bundle.path, platform)
    if key is not None and not force:
        return EngineResult(
            bundle.path,
            False,
            f"{bundle.path} already has engine {key!r} for TensorRT "
            f"{platform.tensorrt_version} on {platform.gpu} (sm {platform.compute_capability})",
        )
    argv = [sys.executable, "-m", "defectscope.cli", "build-engine", str(bundle.path)]
    if timing_cache is not None:
        argv += ["--timing-cache", str(timing_cache)]
    store = ModelStore(rooted(root, cfg.models_dir))
    entry = store_entry(store, rooted(root, station.bundle))
    work = store.models_dir / BUILDS / uuid.uuid4().hex[:12]
    if entry is not None:
        work.mkdir(mode=0o700, parents=True)
        argv += ["--out", str(work / "bundle")]
    argv += shlex.split(build_args)
    try:
        proc = subprocess.run(argv)
        if proc.returncode != 0:
            raise DeployError(f"{' '.join(argv)} exited {proc.returncode}; the station keeps serving what it has")
        if entry is not None and (work / "bundle").is_dir():  # not a --dry-run
            adopt_build(store, entry[0], entry[1], work / "bundle", _manifest_sha(bundle.path))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if reload:
        run_reload(cfg, station)
    why = f" (replacing: {'; '.join(stale)})" if stale else ""
    return EngineResult(
        bundle.path, True, f"built a TensorRT {platform.tensorrt_version} engine into {bundle.path}{why}"
    )


def store_entry(store: ModelStore, bundle_path: Path) -> tuple[str, str] | None:
    """(model name, version) when ``bundle_path`` is ``<models_dir>/<name>/current`` or ``/<version>``, else None."""
    path = PurePosixPath(bundle_path)
    if Path(path.parent.parent) != store.models_dir:
        return None
    name = path.parent.name
    version = store.current(name) if path.name == CURRENT else path.name
    return (name, version) if version and version in store.versions(name) else None


def adopt_build(store: ModelStore, name: str, version: str, built: Path, built_from: str) -> None:
    """Make the verified tree ``built`` (same filesystem) installed ``version`` of ``name``, under the store lock.

    ``built_from``: sha256 of the manifest the build started from; a version reinstalled
    meanwhile keeps its new files and the build is discarded.
    """
    from runtime.bundle.archive import _world_readable
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import BundleError

    with store.lock():
        store.recover(name)
        vdir = store.version_dir(name, version)
        if not vdir.is_dir() or _manifest_sha(vdir) != built_from:
            raise DeployError(f"{vdir}: {name} {version} changed during the engine build; the build was discarded")
        try:
            m = load_bundle(built, verify=True, check_graph=False).manifest.model
        except BundleError as exc:
            raise DeployError(
                f"the engine build's bundle does not verify ({exc}); the station keeps what it has"
            ) from None
        if (m.name, m.version) != (name, version):
            raise DeployError(f"the engine build wrote {m.name} {m.version}, not {name} {version}; discarded")
        _world_readable(built)
        store.replace_version(name, version, built)


def _manifest_sha(bundle_dir: Path) -> str:
    return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()
