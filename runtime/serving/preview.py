"""Live JPEG preview: a small, rate-capped JPEG of each camera's latest frame on its own topic.

Off by default (bandwidth-sensitive sites). Topic ``_preview.<station>.<camera>``: it does not
start with ``<station>.``, so verdict subscribers filtering by station prefix never receive it,
and its ``type`` is ``"preview"``, which verdict decoders reject as not theirs. Payload (JSON, or
msgpack when the publisher uses it): ``{"schema_version": 1, "type": "preview", "station",
"camera", "seq", "captured_at", "width", "height", "jpeg": <base64 JPEG>}``.

The daemon calls ``PreviewEncoder.offer`` for every judged frame on its output thread; a frame
is encoded only when that camera's last preview is older than ``1 / max_fps`` seconds, so the
cost is one time check per frame plus one small JPEG per camera per interval.

Config, table ``[preview]`` of the station TOML:
  enabled = false       # publish previews at all
  max_fps = 2.0         # per camera, previews per second (> 0, <= 30)
  max_width = 320       # px; larger frames are downscaled keeping the aspect ratio
  jpeg_quality = 70     # 1..100
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from runtime.config.strict import field_names, refuse_unknown
from runtime.serving.messages import SCHEMA_VERSION, SchemaError

PREVIEW_PREFIX = "_preview."
MAX_JPEG_BYTES = 512 * 1024  # decoded preview cap a subscriber enforces


def preview_topic(station: str, camera: str) -> str:
    return f"{PREVIEW_PREFIX}{station}.{camera}"


@dataclass(frozen=True)
class PreviewConfig:
    enabled: bool = False
    max_fps: float = 2.0
    max_width: int = 320
    jpeg_quality: int = 70

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], where: str = "preview") -> PreviewConfig:
        refuse_unknown(table, field_names(cls), "", ValueError, where)
        cfg = cls(**dict(table))
        if not isinstance(cfg.enabled, bool):
            raise ValueError(f"key '{where}.enabled': expected true or false, got {cfg.enabled!r}")
        if isinstance(cfg.max_fps, bool) or not isinstance(cfg.max_fps, (int, float)) or not 0 < cfg.max_fps <= 30:
            raise ValueError(f"key '{where}.max_fps': expected a number in (0, 30], got {cfg.max_fps!r}")
        if isinstance(cfg.max_width, bool) or not isinstance(cfg.max_width, int) or not 16 <= cfg.max_width <= 1920:
            raise ValueError(f"key '{where}.max_width': expected an integer in [16, 1920], got {cfg.max_width!r}")
        if (
            isinstance(cfg.jpeg_quality, bool)
            or not isinstance(cfg.jpeg_quality, int)
            or not 1 <= cfg.jpeg_quality <= 100
        ):
            raise ValueError(f"key '{where}.jpeg_quality': expected an integer in [1, 100], got {cfg.jpeg_quality!r}")
        return cfg


class PreviewEncoder:
    """Per-camera rate cap + JPEG encode; not thread-safe (the daemon's output thread owns it)."""

    def __init__(self, cfg: PreviewConfig, station: str, clock: Any = time.monotonic) -> None:
        self.cfg = cfg
        self.station = station
        self.interval = 1.0 / cfg.max_fps
        self.clock = clock
        self._next: dict[str, float] = {}
        self.encoded = 0
        self.skipped = 0

    def offer(self, camera: str, image: np.ndarray, seq: int, captured_at: float) -> tuple[str, dict[str, Any]] | None:
        """(topic, message) when this camera is due a preview, else None (the common, cheap case)."""
        if not self.cfg.enabled:
            return None
        now = self.clock()
        if now < self._next.get(camera, 0.0):
            self.skipped += 1
            return None
        self._next[camera] = now + self.interval
        h, w = image.shape[:2]
        if w > self.cfg.max_width:
            scale = self.cfg.max_width / w
            image = cv2.resize(image, (self.cfg.max_width, max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
        if not ok:
            return None
        self.encoded += 1
        oh, ow = image.shape[:2]
        msg = {
            "schema_version": SCHEMA_VERSION,
            "type": "preview",
            "station": self.station,
            "camera": camera,
            "seq": int(seq),
            "captured_at": round(float(captured_at), 6),
            "width": int(ow),
            "height": int(oh),
            "jpeg": base64.b64encode(buf.tobytes()).decode("ascii"),
        }
        return preview_topic(self.station, camera), msg


def decode_preview(msg: Mapping[str, Any], max_bytes: int = MAX_JPEG_BYTES) -> bytes:
    """A subscriber's check of a preview message -> the JPEG bytes; SchemaError names the bad key."""
    if msg.get("schema_version") != SCHEMA_VERSION or msg.get("type") != "preview":
        raise SchemaError("key 'type': expected a schema-1 'preview' message")
    for key, kind in (("station", str), ("camera", str), ("seq", int), ("jpeg", str)):
        if not isinstance(msg.get(key), kind) or isinstance(msg.get(key), bool):
            raise SchemaError(f"key '{key}': expected {kind.__name__}")
    if len(msg["jpeg"]) > (max_bytes * 4) // 3 + 4:
        raise SchemaError(f"key 'jpeg': larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(msg["jpeg"], validate=True)
    except (binascii.Error, ValueError):
        raise SchemaError("key 'jpeg': not base64") from None
    if data[:2] != b"\xff\xd8":
        raise SchemaError("key 'jpeg': not a JPEG")
    return data
