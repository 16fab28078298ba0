"""Prometheus metrics (names fixed in docs/contracts.md).

All metrics live on the daemon's own registry (plus the process / platform / GC
collectors, so ``process_start_time_seconds`` shows restarts); ``runtime.serving.service``
serves them over HTTP with ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from runtime.serving.device_health import DeviceMetrics
from runtime.serving.messages import VERDICTS

# Seconds: inference on an edge device is ~1-100 ms; end-to-end adds queueing (up to seconds when behind).
INFERENCE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
E2E_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
DETECTION_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
# decode_error: an unreadable file / frame (truncated, zero bytes, not an image); too_small: a frame
# below [model] min_frame_side, never judged; too_large: a file whose header (or a live frame that)
# exceeds [[cameras]] max_pixels, never decoded (files) nor judged.
# Labels of defectscope_model_info (tests/deploy/station_stub.py serves the same series).
MODEL_INFO_LABELS = ("name", "version", "precision", "backend", "inference_precision")
# defectscope_publisher_peers_dropped_total reasons (runtime.serving.subscriptions.DROP_REASONS names them too).
SUBSCRIBER_DROP_REASONS = ("peer_limit", "total_limit")
DROP_REASONS = ("queue_full", "decode_error", "too_small", "too_large", "preprocess_error", "inference_error")


class Metrics:
    def __init__(self, cameras: Iterable[str], classes: Iterable[str] = ()) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        cam = ["camera"]
        self.frames_captured = Counter(
            "defectscope_frames_captured_total", "Frames read from the camera", cam, registry=r
        )
        self.frames_inferred = Counter(
            "defectscope_frames_inferred_total", "Frames judged and published", cam, registry=r
        )
        self.frames_dropped = Counter(
            "defectscope_frames_dropped_total", "Frames dropped before a verdict", ["camera", "reason"], registry=r
        )
        self.defects = Counter(
            "defectscope_defects_total", "Defect verdicts by defect class", ["camera", "class"], registry=r
        )
        # Detectors: the boxes a published verdict carries (defect + uncertain boxes), by class, and their count.
        self.detections = Counter(
            "defectscope_detections_total", "Boxes in published verdicts by class", ["camera", "class"], registry=r
        )
        self.detections_per_frame = Histogram(
            "defectscope_detections_per_frame",
            "Boxes per judged frame (detectors)",
            cam,
            buckets=DETECTION_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter("defectscope_verdicts_total", "Verdicts", ["camera", "verdict"], registry=r)
        self.inference_latency = Histogram(
            "defectscope_inference_latency_seconds",
            "Backend time of one inference call (a micro-batch)",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "defectscope_end_to_end_latency_seconds",
            "Frame read to verdict published",
            cam,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "defectscope_batch_frames", "Frames per inference call", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.tta_expanded = Counter(
            "defectscope_tta_expanded_frames_total",
            "Frames judged with every TTA view (adaptive TTA: scores near a threshold)",
            cam,
            registry=r,
        )
        self.queue_depth = Gauge("defectscope_queue_depth", "Frames waiting for inference", cam, registry=r)
        self.camera_up = Gauge("defectscope_camera_up", "1 while the camera delivers frames", cam, registry=r)
        self.reconnects = Counter(
            "defectscope_camera_reconnects_total",
            "Successful reconnections (a reopened camera delivered a frame)",
            cam,
            registry=r,
        )
        self.reconnect_attempts = Counter(
            "defectscope_camera_reconnect_attempts_total", "Attempts to reopen a failed camera", cam, registry=r
        )
        self.model_info = Gauge(
            "defectscope_model_info", "The model being served (value 1)", list(MODEL_INFO_LABELS), registry=r
        )
        self.publish_errors = Counter(
            "defectscope_publish_errors_total", "Messages that could not be queued", registry=r
        )
        self.model_reloads = Counter(
            "defectscope_model_reloads_total", "Model reloads (SIGHUP) by result", ["result"], registry=r
        )
        self.reload_failed = Gauge(
            "defectscope_model_reload_failed",
            "1 while the last reload failed (the previous model serves), else 0",
            registry=r,
        )
        self.last_frame = Gauge(
            "defectscope_last_frame_timestamp_seconds", "Unix time of the camera's last frame", cam, registry=r
        )
        self.subscribers_dropped = Counter(
            "defectscope_publisher_peers_dropped_total",
            "Subscribers disconnected for subscribing beyond [publisher] limits (per peer or in total)",
            ["reason"],
            registry=r,
        )
        self.snapshots = Counter(
            "defectscope_snapshots_total", "Snapshots by result (saved, dropped, error)", ["result"], registry=r
        )
        self.device = DeviceMetrics(r)  # defectscope_device_*: fed by runtime.serving.device_health
        # Create the label children up front: a counter that exists at 0 makes rate() and alerts work.
        for c in cameras:
            for m in (
                self.frames_captured,
                self.frames_inferred,
                self.queue_depth,
                self.camera_up,
                self.reconnects,
                self.reconnect_attempts,
                self.e2e_latency,
                self.last_frame,
            ):
                m.labels(c)
            for reason in DROP_REASONS:
                self.frames_dropped.labels(c, reason)
            for v in VERDICTS:
                self.verdicts.labels(c, v)
        for result in ("success", "failure"):
            self.model_reloads.labels(result)
        for reason in SUBSCRIBER_DROP_REASONS:
            self.subscribers_dropped.labels(reason)
        self.publish_errors.inc(0)

    def set_model(
        self, name: str, version: str, precision: str, backend: str, inference_precision: str = "f32"
    ) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, precision, backend, inference_precision).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
