"""Prometheus metrics (names fixed in docs/contracts.md) and the HTTP health server.

All metrics live on the daemon's own registry (plus the process / platform / GC
collectors, so ``process_start_time_seconds`` shows restarts). One small HTTP
server answers ``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (ready =
model loaded and every camera delivered a frame recently; JSON body).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

log = logging.getLogger("defectscope.metrics")

# Seconds: inference on an edge device is ~1-100 ms; end-to-end adds queueing (up to seconds when behind).
INFERENCE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
E2E_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
DROP_REASONS = ("queue_full", "preprocess_error", "inference_error")
VERDICTS = ("ok", "defect", "uncertain")


class Metrics:
    def __init__(self, cameras: Iterable[str], classes: Iterable[str] = ()) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        cam = ["camera"]
        self.frames_captured = Counter("defectscope_frames_captured_total", "Frames read from the camera", cam, registry=r)
        self.frames_inferred = Counter("defectscope_frames_inferred_total", "Frames judged and published", cam, registry=r)
        self.frames_dropped = Counter("defectscope_frames_dropped_total", "Frames dropped before a verdict",
                                      ["camera", "reason"], registry=r)
        self.defects = Counter("defectscope_defects_total", "Defect verdicts by defect class", ["camera", "class"],
                               registry=r)
        self.verdicts = Counter("defectscope_verdicts_total", "Verdicts", ["camera", "verdict"], registry=r)
        self.inference_latency = Histogram("defectscope_inference_latency_seconds",
                                           "Backend time of one inference call (a micro-batch)",
                                           buckets=INFERENCE_BUCKETS, registry=r)
        self.e2e_latency = Histogram("defectscope_end_to_end_latency_seconds", "Frame read to verdict published",
                                     cam, buckets=E2E_BUCKETS, registry=r)
        self.batch_size = Histogram("defectscope_batch_frames", "Frames per inference call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.tta_expanded = Counter("defectscope_tta_expanded_frames_total",
                                    "Frames judged with every TTA view (adaptive TTA: scores near a threshold)", cam,
                                    registry=r)
        self.queue_depth = Gauge("defectscope_queue_depth", "Frames waiting for inference", cam, registry=r)
        self.camera_up = Gauge("defectscope_camera_up", "1 while the camera delivers frames", cam, registry=r)
        self.reconnects = Counter("defectscope_camera_reconnects_total", "Attempts to reopen a failed camera", cam,
                                  registry=r)
        self.model_info = Gauge("defectscope_model_info", "The model being served (value 1)",
                                ["name", "version", "precision", "backend"], registry=r)
        self.publish_errors = Counter("defectscope_publish_errors_total", "Messages that could not be queued",
                                      registry=r)
        self.model_reloads = Counter("defectscope_model_reloads_total", "Model reloads (SIGHUP) by result",
                                     ["result"], registry=r)
        self.last_frame = Gauge("defectscope_last_frame_timestamp_seconds", "Unix time of the camera's last frame",
                                cam, registry=r)
        self.snapshots = Counter("defectscope_snapshots_total", "Snapshots by result (saved, dropped, error)",
                                 ["result"], registry=r)
        # Create the label children up front: a counter that exists at 0 makes rate() and alerts work.
        for c in cameras:
            for m in (self.frames_captured, self.frames_inferred, self.queue_depth, self.camera_up, self.reconnects,
                      self.e2e_latency, self.last_frame):
                m.labels(c)
            for reason in DROP_REASONS:
                self.frames_dropped.labels(c, reason)
            for v in VERDICTS:
                self.verdicts.labels(c, v)
        for result in ("success", "failure"):
            self.model_reloads.labels(result)
        self.publish_errors.inc(0)

    def set_model(self, name: str, version: str, precision: str, backend: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, precision, backend).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _V6Server(_Server):
    address_family = socket.AF_INET6


class HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on one port, in a background thread."""

    def __init__(self, host: str, port: int, metrics: Metrics,
                 ready: Callable[[], tuple[bool, dict[str, Any]]],
                 alive: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                    elif path == "/healthz":
                        ok, body = outer.alive()
                        self._json(200 if ok else 503, body)
                    elif path == "/readyz":
                        ok, body = outer.ready()
                        self._json(200 if ok else 503, body)
                    else:
                        self._json(404, {"error": f"no such path {path!r}",
                                         "paths": ["/metrics", "/healthz", "/readyz"]})
                except BrokenPipeError:
                    pass

            def _json(self, code: int, body: dict[str, Any]) -> None:
                self._send(code, (json.dumps(body, indent=1) + "\n").encode(), "application/json")

            def _send(self, code: int, data: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http %s", fmt % args)

        self.metrics, self.ready, self.alive = metrics, ready, alive
        cls = _V6Server if ":" in host else _Server
        try:
            self.httpd = cls((host, port), Handler)
        except OSError as exc:
            raise OSError(f"key 'metrics.port': cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.port = self.httpd.server_address[1]
        self.host = host
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
