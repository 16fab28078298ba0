"""Station config: one TOML file per inspection station, validated on load.

Every problem is reported as ``<file>: key '<dotted.key>': <what was expected>``
and unknown keys are refused (a typo must not silently fall back to a default).
Relative paths are resolved against the config file's directory. The tables are parsed by
``runtime.config.camera_table`` (``[[cameras]]``) and ``runtime.config.sections`` (the rest); the
types they build live in ``runtime.config.types`` and are re-exported here, the name to import.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.config.camera_table import guess_kind, parse_camera
from runtime.config.sections import SECTIONS
from runtime.config.table import ConfigError, Table
from runtime.serving.device_health import DeviceHealthConfig
from runtime.serving.preview import PreviewConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from runtime.config.types import (
    BACKENDS,
    DEFAULT_THRESHOLD,
    FORMATS,
    GST_READERS,
    ID_RE,
    LOG_LEVELS,
    ON_FULL,
    OV_HINTS,
    OV_PRECISIONS,
    ROTATIONS,
    SOURCE_KINDS,
    TTA_MODES,
    VIEW_RE,
    BatchingConfig,
    CameraConfig,
    CurveConfig,
    DaemonConfig,
    DecisionConfig,
    MetricsConfig,
    ModelConfig,
    OpenVINOConfig,
    PublisherConfig,
    SnapshotConfig,
    StationConfig,
    TTAConfig,
)


def from_dict(
    data: Mapping[str, Any], where: str = "(in memory)", base: Path | None = None, default_station: str | None = None
) -> StationConfig:
    """Validate a parsed TOML document; ``base`` resolves relative paths."""
    base = Path(base) if base is not None else Path.cwd()
    root = Table(data, where, "")
    station = root.get("station", str, default_station)
    if station is None:
        raise root.error("station", "missing (required)")
    if not ID_RE.match(station):
        raise root.error("station", f"expected letters, digits, '_' or '-' (no dots), got {station!r}")

    root.used.add("cameras")
    raw_cams = data.get("cameras")
    if not isinstance(raw_cams, list) or not raw_cams:
        raise root.error("cameras", "expected at least one [[cameras]] table")
    cameras = tuple(parse_camera(Table(c, where, f"cameras[{i}]."), base) for i, c in enumerate(raw_cams))
    seen: set[str] = set()
    for i, cam in enumerate(cameras):
        if cam.id in seen:
            raise ConfigError(f"{where}: key 'cameras[{i}].id': duplicate camera id {cam.id!r}")
        seen.add(cam.id)

    sections = {name: parse(root.table(name), base) for name, parse in SECTIONS.items()}
    root.finish()
    return StationConfig(station=station, cameras=cameras, source=where, **sections)


def load_config(path: str | os.PathLike[str]) -> StationConfig:
    """Read and validate a station TOML; the station id defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: station config not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data, where=str(path), base=path.resolve().parent, default_station=path.stem)


def dumps(config: StationConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=False)


__all__ = [
    "BACKENDS",
    "BatchingConfig",
    "CameraConfig",
    "DeviceHealthConfig",
    "ConfigError",
    "CurveConfig",
    "DEFAULT_THRESHOLD",
    "DaemonConfig",
    "DecisionConfig",
    "FORMATS",
    "GST_READERS",
    "ID_RE",
    "LOG_LEVELS",
    "MetricsConfig",
    "ModelConfig",
    "ON_FULL",
    "OV_HINTS",
    "OV_PRECISIONS",
    "OpenVINOConfig",
    "PreviewConfig",
    "PublisherConfig",
    "ROTATIONS",
    "SECTIONS",
    "SOURCE_KINDS",
    "SnapshotConfig",
    "StationConfig",
    "TTAConfig",
    "TTA_MODES",
    "VIEW_RE",
    "dumps",
    "from_dict",
    "guess_kind",
    "load_config",
]
