"""Station config: one TOML file per inspection station, validated on load.

Every problem is reported as ``<file>: key '<dotted.key>': <what was expected>``
and unknown keys are refused (a typo must not silently fall back to a default).
Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runtime.config.table import ConfigError, Table
from runtime.inference.tta import PRESETS as TTA_PRESETS
from runtime.inference.tta import expand_views
from runtime.serving.device_health import SOURCES, DeviceHealthConfig
from runtime.serving.messages import VERDICTS
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
    curve_allow_list_error,
)

# Kept under the old name for the section parsers below (and any added later).
_Table = Table


def _openvino(t: _Table, base: Path) -> OpenVINOConfig:
    d = OpenVINOConfig()
    cache = t.get("cache_dir", str, None)
    cfg = OpenVINOConfig(
        cache_dir=_path(base, cache) if cache else None,
        hint=t.choice("hint", OV_HINTS, d.hint),
        precision=t.choice("precision", OV_PRECISIONS, d.precision),
        infer_requests=t.integer("infer_requests", d.infer_requests, minimum=1, maximum=64),
    )
    t.finish()
    return cfg


def _path(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


def guess_kind(source: str) -> str:
    """Source kind from its string: URL scheme, device index, GStreamer '!' or the filesystem."""
    s = source.strip()
    low = s.lower()
    if low.startswith(("rtsp://", "rtsps://")):
        return "rtsp"
    if low.startswith(("http://", "https://")):
        return "http"
    if s.isdigit() or re.match(r"^/dev/video\d+$", s):
        return "v4l2"
    if "!" in s:
        return "gstreamer"
    if os.path.isdir(s):
        return "directory"
    return "video"


def _camera(t: _Table, base: Path) -> CameraConfig:
    cam_id = t.get("id", str)
    if not ID_RE.match(cam_id):
        raise t.error("id", f"expected letters, digits, '_' or '-' (no dots, at most 64), got {cam_id!r}")
    source = t.get("source", (str, int))
    source = str(source)
    kind = t.choice("kind", SOURCE_KINDS, CameraConfig.kind)
    if (
        kind in ("auto", "directory", "video")
        and not re.match(r"^[a-z]+://", source)
        and "!" not in source
        and not source.isdigit()
    ):
        source = str(_path(base, source))
    if kind == "auto":
        kind = guess_kind(source)
    if kind == "directory" and not os.path.isdir(source):
        raise t.error("source", f"directory {source!r} does not exist")
    if kind == "video" and not os.path.isfile(source):
        raise t.error("source", f"video file {source!r} does not exist (or set kind for a URL / device)")
    fps = t.number("fps", None, minimum=0.0, exclusive=True)
    roi = t.get("roi", list, None)
    if roi is not None:
        if (
            len(roi) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in roi)
            or roi[0] < 0
            or roi[1] < 0
            or roi[2] <= 0
            or roi[3] <= 0
        ):
            raise t.error("roi", f"expected [x, y, width, height] integers (x, y >= 0; width, height > 0), got {roi!r}")
        roi = tuple(roi)
    rotate = t.get("rotate", int, CameraConfig.rotate)
    if rotate not in ROTATIONS:
        raise t.error("rotate", f"expected one of {list(ROTATIONS)} (degrees clockwise), got {rotate!r}")
    default_full = "block" if kind in ("directory", "video") else "drop_oldest"
    initial = t.number("reconnect_initial_s", CameraConfig.reconnect_initial_s, minimum=0.0, exclusive=True)
    maximum = t.number("reconnect_max_s", CameraConfig.reconnect_max_s, minimum=0.0, exclusive=True)
    if maximum < initial:
        raise t.error("reconnect_max_s", f"expected >= reconnect_initial_s ({initial:g}), got {maximum:g}")
    cam = CameraConfig(
        id=cam_id,
        source=source,
        kind=kind,
        fps=fps,
        loop=t.get("loop", bool, CameraConfig.loop),
        roi=roi,
        rotate=rotate,
        queue_size=t.integer("queue_size", CameraConfig.queue_size, minimum=1, maximum=10_000),
        on_full=t.choice("on_full", ON_FULL, default_full),
        reconnect_initial_s=initial,
        reconnect_max_s=maximum,
        read_timeout_s=t.number("read_timeout_s", CameraConfig.read_timeout_s, minimum=0.0, exclusive=True),
        preload_mb=t.number("preload_mb", CameraConfig.preload_mb, minimum=0.0, maximum=1_048_576.0),
        gst_reader=t.choice("gst_reader", GST_READERS, CameraConfig.gst_reader),
        max_pixels=t.integer("max_pixels", CameraConfig.max_pixels, minimum=1, maximum=1 << 31),
    )
    if cam.preload_mb and kind != "directory":
        raise t.error("preload_mb", f"only directory replays can be preloaded; this camera is a {kind} source")
    if cam.gst_reader != "auto" and kind != "gstreamer":
        raise t.error("gst_reader", f"only gstreamer pipelines pick a reader; this camera is a {kind} source")
    t.finish()
    return cam


# Section name -> parser of its table (one dataclass per section; a new section registers here).
SECTIONS: dict[str, Callable[[_Table, Path], Any]] = {}


def _section(name: str) -> Callable[[Callable[[_Table, Path], Any]], Callable[[_Table, Path], Any]]:
    def register(parse: Callable[[_Table, Path], Any]) -> Callable[[_Table, Path], Any]:
        if name in SECTIONS:
            raise ValueError(f"config section {name!r} registered twice")
        SECTIONS[name] = parse
        return parse

    return register


@_section("model")
def _model(t: _Table, base: Path) -> ModelConfig:
    model = ModelConfig(
        bundle=_path(base, t.get("bundle", str)),
        artifact=t.get("artifact", str, None),
        backend=t.choice("backend", BACKENDS, ModelConfig.backend),
        threads=t.integer("threads", ModelConfig.threads, minimum=1, maximum=256),
        device_id=t.integer("device_id", ModelConfig.device_id, minimum=0),
        dla_core=t.integer("dla_core", ModelConfig.dla_core, minimum=0, maximum=15),
        warmup_runs=t.integer("warmup_runs", ModelConfig.warmup_runs, minimum=0, maximum=1000),
        openvino=_openvino(t.table("openvino"), base),
        min_frame_side=t.integer("min_frame_side", ModelConfig.min_frame_side, minimum=1, maximum=100_000),
    )
    t.finish()
    return model


@_section("batching")
def _batching(t: _Table, base: Path) -> BatchingConfig:
    batching = BatchingConfig(
        max_batch=t.integer("max_batch", BatchingConfig.max_batch, minimum=1, maximum=1024),
        max_wait_ms=t.number("max_wait_ms", BatchingConfig.max_wait_ms, minimum=0.0, maximum=10_000.0),
        zero_copy=t.get("zero_copy", bool, BatchingConfig.zero_copy),
    )
    t.finish()
    return batching


def _expand_presets(views: list[str]) -> list[str]:
    """Presets (``flips``, ``dihedral``, ...: runtime.inference.tta's one definition) expand in place; the
    first named view stays first (it judges every frame in ``uncertain`` mode)."""
    out: list[str] = []
    for v in views:
        out += [e for e in (expand_views(v) if v in TTA_PRESETS else (v,)) if e not in out]
    return out


@_section("tta")
def _tta(t: _Table, base: Path) -> TTAConfig:
    raw = t.get("views", (list, str), list(TTAConfig.views))
    if not raw or not all(isinstance(v, str) for v in raw):
        raise t.error("views", f"expected a preset name or a non-empty array of view or preset names, got {raw!r}")
    raw = [raw] if isinstance(raw, str) else raw
    if len(set(raw)) != len(raw):
        raise t.error("views", f"duplicate views in {raw}")
    views = _expand_presets(raw)
    for v in views:
        m = VIEW_RE.match(v)
        if not m or (m.group(2) is not None and not 0.25 <= float(m.group(2)) <= 4.0):
            raise t.error(
                "views",
                f"unknown view {v!r}; expected a preset {list(TTA_PRESETS)}, 'original', "
                "'hflip', 'vflip', 'rot90', 'rot180', 'rot270', 'transpose', 'transverse' or "
                "'scale:F' (F = factor on the manifest's resize_size, 0.25..4)",
            )
    mode = t.get("mode", str, TTAConfig.mode)
    if mode not in TTA_MODES:
        raise t.error("mode", f"expected one of {list(TTA_MODES)}, got {mode!r}")
    if mode == "uncertain" and len(views) < 2:
        raise t.error(
            "mode",
            "'uncertain' needs at least two views (the first judges every frame, the others "
            f"the frames near a threshold), got views = {views}",
        )
    band = t.number("band", TTAConfig.band, minimum=0.0, exclusive=True, maximum=1.0)
    tta = TTAConfig(views=tuple(views), mode=mode, band=band)
    t.finish()
    return tta


@_section("decision")
def _decision(t: _Table, base: Path) -> DecisionConfig:
    thresholds = t.get("thresholds", Mapping, {})
    for name, value in thresholds.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ConfigError(
                f"{t.where}: key 'decision.thresholds.{name}': expected a probability in [0, 1], got {value!r}"
            )
    good = t.get("good_classes", list, None)
    if good is not None and (not good or not all(isinstance(g, str) for g in good)):
        raise t.error("good_classes", f"expected a non-empty array of class names, got {good!r}")
    decision = DecisionConfig(
        default_threshold=t.number("default_threshold", DecisionConfig.default_threshold, minimum=0.0, maximum=1.0),
        thresholds={k: float(v) for k, v in thresholds.items()},
        uncertain_band=t.number("uncertain_band", DecisionConfig.uncertain_band, minimum=0.0, maximum=0.5),
        good_classes=tuple(good) if good is not None else None,
        min_box_area=t.number("min_box_area", DecisionConfig.min_box_area, minimum=0.0, maximum=1e12),
    )
    t.finish()
    return decision


@_section("publisher")
def _publisher(t: _Table, base: Path) -> PublisherConfig:
    bind = t.get("bind", (list, str), list(PublisherConfig.bind))
    bind = [bind] if isinstance(bind, str) else bind
    if not bind or not all(isinstance(b, str) and re.match(r"^(tcp|ipc|inproc)://.+", b) for b in bind):
        raise t.error(
            "bind", f"expected ZeroMQ endpoints like 'tcp://127.0.0.1:5555' or 'ipc:///run/x.sock', got {bind!r}"
        )
    curve = None
    if "curve" in t.data:
        c = t.table("curve")
        clients = c.get("authorized_clients", str, None)
        curve = CurveConfig(
            server_secret_key=_path(base, c.get("server_secret_key", str)),
            authorized_clients=_path(base, clients) if clients else None,
            allow_any_client=c.get("allow_any_client", bool, CurveConfig.allow_any_client),
        )
        if not curve.server_secret_key.is_file():
            raise c.error("server_secret_key", f"key file {str(curve.server_secret_key)!r} does not exist")
        if curve.authorized_clients is not None and not curve.authorized_clients.is_dir():
            raise c.error("authorized_clients", f"directory {str(curve.authorized_clients)!r} does not exist")
        if (why := curve_allow_list_error(curve)) is not None:
            raise c.error("authorized_clients", why)
        c.finish()
    publisher = PublisherConfig(
        bind=tuple(bind),
        format=t.choice("format", FORMATS, PublisherConfig.format),
        sndhwm=t.integer("sndhwm", PublisherConfig.sndhwm, minimum=1),
        sndbuf=t.integer("sndbuf", PublisherConfig.sndbuf, minimum=0),
        wait_for_subscribers=t.integer("wait_for_subscribers", PublisherConfig.wait_for_subscribers, minimum=0),
        wait_timeout_s=t.number("wait_timeout_s", PublisherConfig.wait_timeout_s, minimum=0.0),
        status_interval_s=t.number("status_interval_s", PublisherConfig.status_interval_s, minimum=0.0),
        curve=curve,
        max_inbound_bytes=t.integer(
            "max_inbound_bytes", PublisherConfig.max_inbound_bytes, minimum=64, maximum=1 << 20
        ),
        max_subscriptions_per_peer=t.integer(
            "max_subscriptions_per_peer", PublisherConfig.max_subscriptions_per_peer, minimum=1, maximum=1 << 20
        ),
        max_subscription_bytes_per_peer=t.integer(
            "max_subscription_bytes_per_peer",
            PublisherConfig.max_subscription_bytes_per_peer,
            minimum=0,
            maximum=1 << 24,
        ),
        max_subscriptions=t.integer("max_subscriptions", PublisherConfig.max_subscriptions, minimum=1, maximum=1 << 20),
        drop_ban_s=t.number("drop_ban_s", PublisherConfig.drop_ban_s, minimum=0.0, maximum=86400.0),
        max_subscription_bytes=t.integer(
            "max_subscription_bytes", PublisherConfig.max_subscription_bytes, minimum=0, maximum=1 << 26
        ),
    )
    t.finish()
    return publisher


@_section("metrics")
def _metrics(t: _Table, base: Path) -> MetricsConfig:
    metrics = MetricsConfig(
        host=t.get("host", str, MetricsConfig.host),
        port=t.integer("port", MetricsConfig.port, minimum=0, maximum=65535),
        ready_max_frame_age_s=t.number(
            "ready_max_frame_age_s", MetricsConfig.ready_max_frame_age_s, minimum=0.0, exclusive=True
        ),
        http_timeout_s=t.number(
            "http_timeout_s", MetricsConfig.http_timeout_s, minimum=0.0, exclusive=True, maximum=300.0
        ),
        http_max_connections=t.integer(
            "http_max_connections", MetricsConfig.http_max_connections, minimum=1, maximum=1024
        ),
    )
    t.finish()
    return metrics


@_section("snapshots")
def _snapshots(t: _Table, base: Path) -> SnapshotConfig:
    verdicts = t.get("verdicts", list, list(SnapshotConfig.verdicts))
    if not all(v in VERDICTS for v in verdicts):
        raise t.error("verdicts", f"expected verdicts from {list(VERDICTS)}, got {verdicts!r}")
    snapshots = SnapshotConfig(
        enabled=t.get("enabled", bool, SnapshotConfig.enabled),
        dir=_path(base, t.get("dir", str, str(SnapshotConfig.dir))),
        quota_mb=t.number("quota_mb", SnapshotConfig.quota_mb, minimum=0.0, exclusive=True),
        verdicts=tuple(verdicts),
        jpeg_quality=t.integer("jpeg_quality", SnapshotConfig.jpeg_quality, minimum=1, maximum=100),
        queue_size=t.integer("queue_size", SnapshotConfig.queue_size, minimum=1),
    )
    t.finish()
    return snapshots


@_section("preview")
def _preview(t: _Table, base: Path) -> PreviewConfig:
    t.used.update(t.data)  # PreviewConfig.from_dict refuses unknown keys itself, naming them
    try:
        return PreviewConfig.from_dict(t.data, t.key(""))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{t.where}: {exc}") from None


@_section("device_health")
def _device_health(t: _Table, base: Path) -> DeviceHealthConfig:
    cfg = DeviceHealthConfig(
        source=t.choice("source", SOURCES, DeviceHealthConfig.source),
        interval_s=t.number("interval_s", DeviceHealthConfig.interval_s, minimum=0.1, maximum=60.0),
        tegrastats=t.get("tegrastats", str, DeviceHealthConfig.tegrastats),
        gpu_index=t.integer("gpu_index", DeviceHealthConfig.gpu_index, minimum=0, maximum=63),
    )
    t.finish()
    return cfg


@_section("daemon")
def _daemon(t: _Table, base: Path) -> DaemonConfig:
    pid = t.get("pid_file", str, None)
    daemon = DaemonConfig(
        pid_file=_path(base, pid) if pid else None,
        drain_timeout_s=t.number("drain_timeout_s", DaemonConfig.drain_timeout_s, minimum=0.0),
        stall_timeout_s=t.number("stall_timeout_s", DaemonConfig.stall_timeout_s, minimum=0.0, exclusive=True),
        exit_when_sources_end=t.get("exit_when_sources_end", bool, DaemonConfig.exit_when_sources_end),
        log_level=t.choice("log_level", LOG_LEVELS, DaemonConfig.log_level),
        switch_interval_ms=t.number(
            "switch_interval_ms", DaemonConfig.switch_interval_ms, minimum=0.0, exclusive=True, maximum=100.0
        ),
    )
    t.finish()
    return daemon


def from_dict(
    data: Mapping[str, Any], where: str = "(in memory)", base: Path | None = None, default_station: str | None = None
) -> StationConfig:
    """Validate a parsed TOML document; ``base`` resolves relative paths."""
    base = Path(base) if base is not None else Path.cwd()
    root = _Table(data, where, "")
    station = root.get("station", str, default_station)
    if station is None:
        raise root.error("station", "missing (required)")
    if not ID_RE.match(station):
        raise root.error("station", f"expected letters, digits, '_' or '-' (no dots), got {station!r}")

    root.used.add("cameras")
    raw_cams = data.get("cameras")
    if not isinstance(raw_cams, list) or not raw_cams:
        raise root.error("cameras", "expected at least one [[cameras]] table")
    cameras = tuple(_camera(_Table(c, where, f"cameras[{i}]."), base) for i, c in enumerate(raw_cams))
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
    "ID_RE",
    "LOG_LEVELS",
    "MetricsConfig",
    "ModelConfig",
    "ON_FULL",
    "OV_HINTS",
    "OV_PRECISIONS",
    "OpenVINOConfig",
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
