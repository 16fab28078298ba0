"""Camera sources: one capture thread per camera feeding the frame hub (readers: ``runtime.sources.readers``).

Each camera runs in its own thread and feeds a bounded per-camera queue in the
:class:`runtime.serving.batcher.FrameHub`. A live camera never waits for inference: when its queue is
full the OLDEST frame is dropped (counted) so the newest view of the line is
what gets judged. Replays (image directories, video files) default to blocking
instead, so every frame of a replay is inferred. A camera that fails to open or
stops delivering is reopened with exponential backoff and jitter; the other
cameras are unaffected.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from runtime.config.station import CameraConfig
from runtime.inference.preprocess import ImageReadError, ImageTooLarge
from runtime.serving.batcher import FrameHub
from runtime.sources.readers import Reader, SourceError, _safe, open_reader

if TYPE_CHECKING:
    from runtime.inference.boxes import Geometry

log = logging.getLogger("defectscope.sources")

_ROTATE = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


class FrameRejected(ValueError):
    """A frame the model must not judge; ``reason`` is its ``frames_dropped_total`` label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RateLimitedLog:
    """The first event logs at once; later ones are summed into one line per ``interval_s``."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} more like it in the last {self.interval_s:.0f}s)"
        self.logger.warning(msg, *args)
        self._next, self._suppressed = now + self.interval_s, 0


@dataclass
class Frame:
    """One captured frame on its way through the pipeline."""

    camera: str
    seq: int  # per camera, from 0, never reused within a daemon run
    image: np.ndarray  # uint8 (H,W) gray or (H,W,3) BGR, after rotation + ROI
    captured_at: float  # wall clock (time.time()) when the frame was read, seconds
    t_capture: float  # time.monotonic() at the same moment (latency arithmetic)
    source: str | None = None  # file name for replays
    tensor: np.ndarray | None = None  # (V,C,H,W) float32: TTA views, prepared on the capture thread
    generation: int = -1  # model generation the tensor was prepared for
    preprocess_s: float = 0.0
    # runtime.inference.boxes.Geometry of ``image`` -> the model input (detectors: maps boxes back to ``image``
    # pixels); set with ``tensor``, None for a center-cropping classifier.
    geometry: Geometry | None = None
    # (runtime.serving.batcher.FrameSlots, index): the arena slot ``tensor`` lives in ([batching] zero_copy).
    slot: tuple[Any, int] | None = None


def transform(image: np.ndarray, cfg: CameraConfig) -> np.ndarray:
    """Rotation (clockwise) then ROI crop, as configured; the ROI is clipped to the frame."""
    if cfg.rotate:
        image = cv2.rotate(image, _ROTATE[cfg.rotate])
    if cfg.roi is not None:
        x, y, w, h = cfg.roi
        H, W = image.shape[:2]
        if x >= W or y >= H:
            raise SourceError(f"roi {list(cfg.roi)} lies outside the {W}x{H} frame")
        image = image[y : min(y + h, H), x : min(x + w, W)]
    return image


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, capped at ``maximum``."""
    base = min(maximum, initial * (2.0 ** min(attempt, 30)))
    return base / 2.0 + rng.uniform(0.0, base / 2.0)


class CameraEvents(Protocol):
    """What a camera thread reports to (metrics, readiness)."""

    def captured(self, camera: str, at: float) -> None: ...
    def dropped(self, camera: str, reason: str, n: int = 1) -> None: ...
    def up(self, camera: str, up: bool) -> None: ...
    def reconnect_attempt(self, camera: str) -> None: ...
    def reconnected(self, camera: str) -> None: ...


class Camera:
    """One capture thread: open, read, transform, prepare, enqueue; reopen with backoff on failure."""

    def __init__(
        self,
        cfg: CameraConfig,
        hub: FrameHub,
        events: CameraEvents,
        prepare: Callable[[Frame], None] | None = None,
        seed: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.hub = hub
        self.events = events
        self.prepare = prepare
        self.seq = 0
        self.finished = threading.Event()  # a finite replay reached its end
        self.is_up = False
        self.last_frame_at: float | None = None  # time.monotonic()
        self._stop = threading.Event()
        self._rng = random.Random(seed)
        self._awaiting_reconnect = False  # reopened after a failure, no frame yet
        self._fail_log = RateLimitedLog(log)  # open / read failures
        self._skip_log = RateLimitedLog(log)  # unreadable or rejected frames, once per source
        self._thread = threading.Thread(target=self._run, name=f"camera-{cfg.id}", daemon=True)
        hub.add_camera(cfg.id, cfg.queue_size)

    # ---- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- thread ------------------------------------------------------------
    def _set_up(self, up: bool) -> None:
        if up != self.is_up:
            self.is_up = up
            self.events.up(self.cfg.id, up)
            if up:
                log.info("camera %s: up (%s)", self.cfg.id, _safe(self.cfg.source))

    def _run(self) -> None:
        cfg = self.cfg
        failures = 0  # consecutive failed opens / lost streams, drives the backoff
        opened_before = False
        self.events.up(cfg.id, False)
        while not self._stop.is_set():
            reopening = opened_before or failures > 0
            if reopening:
                self.events.reconnect_attempt(cfg.id)
            try:
                reader = open_reader(cfg, on_unreadable=self._unreadable)
            except Exception as exc:  # SourceError, or cv2.error for a malformed source string
                failures += 1
                self._failed(failures, "cannot open source" if not isinstance(exc, SourceError) else "", exc)
                continue
            opened_before = True
            self._awaiting_reconnect = reopening
            try:
                ended = self._read_loop(reader)
            except (SourceError, ImageReadError, cv2.error) as exc:
                failures += 1
                self._failed(failures, "lost", exc)
                continue
            else:
                if ended:
                    log.info("camera %s: replay finished after %d frames", cfg.id, self.seq)
                    self.finished.set()
                    self._set_up(False)
                    return
                failures = 0
            finally:
                reader.close()
        self._set_up(False)

    def _failed(self, failures: int, what: str, exc: Exception) -> None:
        """Mark down, log (rate-limited: a dead camera retries every few seconds) and back off."""
        cfg = self.cfg
        self._set_up(False)
        delay = backoff_delay(failures - 1, cfg.reconnect_initial_s, cfg.reconnect_max_s, self._rng)
        self._fail_log.warning("camera %s: %s%s; retrying in %.1fs", cfg.id, f"{what}: " if what else "", exc, delay)
        self._stop.wait(delay)

    def _unreadable(self, path: str, exc: Exception) -> None:
        self.events.dropped(self.cfg.id, "too_large" if isinstance(exc, ImageTooLarge) else "decode_error")
        self._skip_log.warning("camera %s: skipping unreadable frame: %s", self.cfg.id, exc)

    def _read_loop(self, reader: Reader) -> bool:
        """Read until stop (False) or the end of a finite replay (True)."""
        cfg = self.cfg
        period = 1.0 / cfg.fps if cfg.fps else 0.0
        next_due = time.monotonic()
        block = cfg.on_full == "block"
        while not self._stop.is_set():
            item = reader.read()
            if item is None:
                return True
            now = time.monotonic()
            if period:
                if now < next_due:
                    if reader.live:
                        continue  # faster than the cap: skip (not a drop: the operator asked for this rate)
                    self._stop.wait(next_due - now)
                    now = time.monotonic()
                next_due = max(next_due + period, now - period)
            image, name = item
            if image.shape[0] * image.shape[1] > cfg.max_pixels:  # decoded already by the capture backend
                self.events.captured(cfg.id, time.time())
                self.events.dropped(cfg.id, "too_large")
                self._skip_log.warning(
                    "camera %s: %dx%d frame is larger than max_pixels (%d)",
                    cfg.id,
                    image.shape[1],
                    image.shape[0],
                    cfg.max_pixels,
                )
                continue
            frame = Frame(cfg.id, self.seq, transform(image, cfg), time.time(), now, name)
            self.seq += 1
            self.last_frame_at = now
            self._set_up(True)
            if self._awaiting_reconnect:  # a reopened source delivered: that is a reconnection
                self._awaiting_reconnect = False
                self.events.reconnected(cfg.id)
            self.events.captured(cfg.id, frame.captured_at)
            if self.prepare is not None and not self._prepared(frame):
                continue
            if self.hub.put(frame, block, self._stop) is not None:
                self.events.dropped(cfg.id, "queue_full")
        return False

    def _prepared(self, frame: Frame) -> bool:
        assert self.prepare is not None
        try:
            self.prepare(frame)
            return True
        except FrameRejected as exc:
            self.events.dropped(self.cfg.id, exc.reason)
            self._skip_log.warning("camera %s: frame %d rejected: %s", self.cfg.id, frame.seq, exc)
        except Exception as exc:  # a frame the model cannot take: drop it, keep the camera
            log.error("camera %s: frame %d could not be preprocessed: %s", self.cfg.id, frame.seq, exc)
            self.events.dropped(self.cfg.id, "preprocess_error")
        return False
