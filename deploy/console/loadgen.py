"""Realistic station traffic without a model: schema-1 (detection: 2) verdict and status messages on a real ZeroMQ PUB.

Used by bench/bench_console.py (4 stations x 4 cameras x 30 verdicts/s) and the console tests.
Messages carry every field the daemon sends (runtime/serving/messages.py validates them).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from runtime.serving.messages import DETECTION_SCHEMA_VERSION, SCHEMA_VERSION, encode, status_topic, verdict_topic

MODEL = {
    "name": "elpv-lite0",
    "version": "1.2.0",
    "precision": "int8",
    "artifact": "int8",
    "backend": "onnxruntime-cpu",
}


def verdict_message(
    station: str,
    camera: str,
    seq: int,
    verdict: str = "ok",
    *,
    snapshot: str | None = None,
    task: str = "classification",
    detections: list[dict[str, Any]] | None = None,
    captured_at: float | None = None,
    classes: tuple[str, ...] = ("ok", "defect"),
    model: dict[str, str] | None = None,
) -> dict[str, Any]:
    now = time.time()
    captured = now - 0.012 if captured_at is None else captured_at
    score = 0.93 if verdict != "uncertain" else 0.55
    top = classes[0] if verdict == "ok" else classes[-1]
    scores = {c: (score if c == top else round((1 - score) / max(1, len(classes) - 1), 5)) for c in classes}
    msg: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION if task == "classification" else DETECTION_SCHEMA_VERSION,
        "type": "verdict",
        "station": station,
        "camera": camera,
        "seq": seq,
        "source": f"part-{seq:08d}",
        "captured_at": round(captured, 6),
        "published_at": round(now, 6),
        "model": dict(model or MODEL),
        "task": task,
        "top_class": top,
        "top_score": score,
        "verdict": verdict,
        "defect_class": top if verdict == "defect" else None,
        "confidence": score,
        "latency_ms": {"queue": 0.4, "preprocess": 1.1, "inference": 7.9, "total": 11.8},
        "tta_views": 1,
        "snapshot": snapshot,
    }
    if task == "classification":
        msg["probabilities"] = scores
    else:
        msg["class_scores"] = scores
        msg["detections"] = list(detections or [])
    return msg


def status_message(
    station: str, cameras: dict[str, bool], state: str = "serving", model: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "status",
        "station": station,
        "state": state,
        "published_at": time.time(),
        "model": dict(model or MODEL),
        "cameras": {c: {"up": up, "captured": 0, "published": 0, "dropped": 0} for c, up in cameras.items()},
    }


class FakeStation:
    """A bound PUB socket that speaks the daemon's wire format."""

    def __init__(
        self,
        name: str,
        endpoint: str = "tcp://127.0.0.1:0",
        sndhwm: int = 100_000,
        curve_secret: bytes | None = None,
        curve_public: bytes | None = None,
    ) -> None:
        self.name = name
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, 2000)
        if curve_secret is not None:
            self.sock.curve_secretkey = curve_secret
            self.sock.curve_publickey = curve_public
            self.sock.curve_server = True
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sent = 0
        self._lock = threading.Lock()  # ZeroMQ sockets are not thread-safe: heartbeats share this one
        self._beating: threading.Event | None = None
        self.cameras: dict[str, bool] = {}
        self.state = "serving"

    def send(self, topic: str, msg: dict[str, Any], fmt: str = "json") -> None:
        with self._lock:
            self.sock.send_multipart([topic.encode(), encode(msg, fmt)])

    def heartbeats(self, cameras: dict[str, bool], interval_s: float = 0.2) -> None:
        """Send a status heartbeat every ``interval_s`` from a thread (like the daemon) until ``stop_heartbeats``;
        change ``self.cameras`` / ``self.state`` to change what the next one says."""
        self.cameras = dict(cameras)
        stop = self._beating = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                self.status(dict(self.cameras), self.state)
                stop.wait(interval_s)

        threading.Thread(target=beat, name=f"heartbeat-{self.name}", daemon=True).start()

    def stop_heartbeats(self) -> None:
        if self._beating is not None:
            self._beating.set()

    def verdict(self, camera: str, seq: int, verdict: str = "ok", **kw: Any) -> dict[str, Any]:
        msg = verdict_message(self.name, camera, seq, verdict, **kw)
        self.send(verdict_topic(self.name, camera, verdict), msg)
        self.sent += 1
        return msg

    def status(self, cameras: dict[str, bool], state: str = "serving") -> None:
        self.send(status_topic(self.name), status_message(self.name, cameras, state))

    def close(self) -> None:
        self.stop_heartbeats()
        with self._lock:
            self.sock.close()
        self.ctx.term()
