"""The station config's sections besides ``[[cameras]]``: one parser per table, registered by name.

Each parser reads its table into the section's frozen dataclass (``runtime.config.types``), every
default taken from that dataclass; ``from_dict`` runs them all, so a new section only registers here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runtime.config.table import ConfigError, Table, config_path
from runtime.config.types import (
    BACKENDS,
    FORMATS,
    LOG_LEVELS,
    OV_HINTS,
    OV_PRECISIONS,
    TTA_MODES,
    VIEW_RE,
    BatchingConfig,
    CurveConfig,
    DaemonConfig,
    DecisionConfig,
    MetricsConfig,
    ModelConfig,
    OpenVINOConfig,
    PublisherConfig,
    SnapshotConfig,
    TTAConfig,
    curve_allow_list_error,
)
from runtime.inference.tta import PRESETS as TTA_PRESETS
from runtime.inference.tta import expand_views
from runtime.serving.device_health import SOURCES, DeviceHealthConfig
from runtime.serving.messages import VERDICTS
from runtime.serving.preview import PreviewConfig


def _openvino(t: Table, base: Path) -> OpenVINOConfig:
    d = OpenVINOConfig()
    cache = t.get("cache_dir", str, None)
    cfg = OpenVINOConfig(
        cache_dir=config_path(base, cache) if cache else None,
        hint=t.choice("hint", OV_HINTS, d.hint),
        precision=t.choice("precision", OV_PRECISIONS, d.precision),
        infer_requests=t.integer("infer_requests", d.infer_requests, minimum=1, maximum=64),
    )
    t.finish()
    return cfg


# Section name -> parser of its table (one dataclass per section; a new section registers here).
SECTIONS: dict[str, Callable[[Table, Path], Any]] = {}


def _section(name: str) -> Callable[[Callable[[Table, Path], Any]], Callable[[Table, Path], Any]]:
    def register(parse: Callable[[Table, Path], Any]) -> Callable[[Table, Path], Any]:
        if name in SECTIONS:
            raise ValueError(f"config section {name!r} registered twice")
        SECTIONS[name] = parse
        return parse

    return register


@_section("model")
def _model(t: Table, base: Path) -> ModelConfig:
    model = ModelConfig(
        bundle=config_path(base, t.get("bundle", str)),
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
def _batching(t: Table, base: Path) -> BatchingConfig:
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
def _tta(t: Table, base: Path) -> TTAConfig:
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
def _decision(t: Table, base: Path) -> DecisionConfig:
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
def _publisher(t: Table, base: Path) -> PublisherConfig:
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
            server_secret_key=config_path(base, c.get("server_secret_key", str)),
            authorized_clients=config_path(base, clients) if clients else None,
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
def _metrics(t: Table, base: Path) -> MetricsConfig:
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
def _snapshots(t: Table, base: Path) -> SnapshotConfig:
    verdicts = t.get("verdicts", list, list(SnapshotConfig.verdicts))
    if not all(v in VERDICTS for v in verdicts):
        raise t.error("verdicts", f"expected verdicts from {list(VERDICTS)}, got {verdicts!r}")
    snapshots = SnapshotConfig(
        enabled=t.get("enabled", bool, SnapshotConfig.enabled),
        dir=config_path(base, t.get("dir", str, str(SnapshotConfig.dir))),
        quota_mb=t.number("quota_mb", SnapshotConfig.quota_mb, minimum=0.0, exclusive=True),
        verdicts=tuple(verdicts),
        jpeg_quality=t.integer("jpeg_quality", SnapshotConfig.jpeg_quality, minimum=1, maximum=100),
        queue_size=t.integer("queue_size", SnapshotConfig.queue_size, minimum=1),
    )
    t.finish()
    return snapshots


@_section("preview")
def _preview(t: Table, base: Path) -> PreviewConfig:
    t.used.update(t.data)  # PreviewConfig.from_dict refuses unknown keys itself, naming them
    try:
        return PreviewConfig.from_dict(t.data, t.key(""))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{t.where}: {exc}") from None


@_section("device_health")
def _device_health(t: Table, base: Path) -> DeviceHealthConfig:
    cfg = DeviceHealthConfig(
        source=t.choice("source", SOURCES, DeviceHealthConfig.source),
        interval_s=t.number("interval_s", DeviceHealthConfig.interval_s, minimum=0.1, maximum=60.0),
        tegrastats=t.get("tegrastats", str, DeviceHealthConfig.tegrastats),
        gpu_index=t.integer("gpu_index", DeviceHealthConfig.gpu_index, minimum=0, maximum=63),
    )
    t.finish()
    return cfg


@_section("daemon")
def _daemon(t: Table, base: Path) -> DaemonConfig:
    pid = t.get("pid_file", str, None)
    daemon = DaemonConfig(
        pid_file=config_path(base, pid) if pid else None,
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
