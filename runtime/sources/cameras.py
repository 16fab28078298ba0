"""Camera sources: OpenCV readers, one capture thread per camera, and the frame hub.

Each camera runs in its own thread and feeds a bounded per-camera queue in the
:class:`runtime.serving.batcher.FrameHub`. A live camera never waits for inference: when its queue is
full the OLDEST frame is dropped (counted) so the newest view of the line is
what gets judged. Replays (image directories, video files) default to blocking
instead, so every frame of a replay is inferred. A camera that fails to open or
stops delivering is reopened with exponential backoff and jitter; the other
cameras are unaffected.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from runtime.config.station import CameraConfig
from runtime.inference.preprocess import ImageReadError, ImageTooLarge, read_image, to_uint8
from runtime.serving.batcher import FrameHub

if TYPE_CHECKING:
    from runtime.inference.boxes import Geometry

log = logging.getLogger("defectscope.sources")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
_ROTATE = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


class SourceError(RuntimeError):
    """A source that cannot be opened or stopped delivering (the camera thread will retry)."""


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


class Reader(Protocol):
    live: bool  # True: pace by dropping, never sleep; False (replay): sleep to the fps cap

    def read(self) -> tuple[np.ndarray, str | None] | None:
        """Next frame (image, source name); None at the end of a finite replay; SourceError on failure."""

    def close(self) -> None: ...


class DirectoryReader:
    """Replay of the image files in a directory (sorted by name), optionally looping.

    Decoding runs ``prefetch`` images ahead on a small thread pool (OpenCV releases
    the GIL), so on a multi-core device decoding overlaps preprocessing and inference.
    """

    live = False

    def __init__(
        self,
        path: str,
        loop: bool,
        prefetch: int = 4,
        workers: int = 2,
        on_unreadable: Callable[[str, Exception], None] | None = None,
        preload_mb: float = 0.0,
        max_pixels: int = CameraConfig.max_pixels,
    ) -> None:
        self.path, self.loop = path, loop
        self.max_pixels = max_pixels
        # Called once per skipped file (decode errors are counted, not fatal); default: log it.
        self.on_unreadable = on_unreadable or (lambda p, exc: log.warning("skipping unreadable replay image: %s", exc))
        try:
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        except OSError as exc:
            raise SourceError(f"{path}: cannot list directory: {exc}") from None
        if not names:
            raise SourceError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.files = [os.path.join(path, n) for n in names]
        self._iter = self._files()
        self._ahead: deque[tuple[str, Future[np.ndarray] | None]] = deque()
        self._prefetch = prefetch
        self._images: list[tuple[np.ndarray, str]] | None = None
        self._cursor = 0
        if preload_mb > 0:
            self._images = self._preload(preload_mb)
            prefetch = 0  # decoded already: no decode threads
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") if prefetch else None

    def _preload(self, budget_mb: float) -> list[tuple[np.ndarray, str]]:
        """Every readable image decoded once; read-only, because the same array is replayed again."""
        images, used, budget = [], 0, int(budget_mb * 2**20)
        for path in self.files:
            try:
                image = read_image(path, self.max_pixels)
            except ImageReadError as exc:
                self.on_unreadable(path, exc)
                continue
            used += image.nbytes
            if used > budget:
                raise SourceError(
                    f"{path}: preloading {self.path} needs more than preload_mb = "
                    f"{budget_mb:g} MB of decoded images; raise it or set 0 to decode "
                    "while replaying"
                ) from None
            image.setflags(write=False)
            images.append((image, os.path.basename(path)))
        if not images:
            raise SourceError(f"{self.path}: none of the {len(self.files)} image files is readable")
        return images

    def _next_preloaded(self) -> tuple[np.ndarray, str] | None:
        assert self._images is not None
        if self._cursor >= len(self._images):
            if not self.loop:
                return None
            self._cursor = 0
        item = self._images[self._cursor]
        self._cursor += 1
        return item

    def _files(self) -> Iterator[str]:
        while True:
            yield from self.files
            if not self.loop:
                return

    def _fill(self) -> None:
        while len(self._ahead) < max(1, self._prefetch):
            path = next(self._iter, None)
            if path is None:
                return
            self._ahead.append((path, self._pool.submit(read_image, path, self.max_pixels) if self._pool else None))

    def read(self) -> tuple[np.ndarray, str | None] | None:
        if self._images is not None:
            return self._next_preloaded()
        skipped = 0
        while True:
            self._fill()
            if not self._ahead:
                return None
            path, fut = self._ahead.popleft()
            try:
                image = fut.result() if fut is not None else read_image(path, self.max_pixels)
                return image, os.path.basename(path)
            except ImageReadError as exc:
                self.on_unreadable(path, exc)
                skipped += 1
                if skipped >= len(self.files):  # a whole pass of a looping replay: never spin on it
                    raise SourceError(f"{self.path}: none of the {len(self.files)} image files is readable") from None

    def close(self) -> None:
        if self._pool is not None:
            for _, fut in self._ahead:
                if fut is not None:
                    fut.cancel()
            self._pool.shutdown(wait=False)
            self._ahead.clear()


class CaptureReader:
    """cv2.VideoCapture over a video file, V4L2 device, RTSP/HTTP URL or GStreamer pipeline."""

    def __init__(self, cfg: CameraConfig) -> None:
        self.cfg = cfg
        self.live = cfg.kind != "video"
        timeout_ms = int(cfg.read_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        if cfg.kind == "v4l2":
            dev = cfg.source
            index = int(dev) if dev.isdigit() else int(dev.removeprefix("/dev/video"))
            cap = cv2.VideoCapture(index, cv2.CAP_V4L2)
        elif cfg.kind == "gstreamer":
            cap = cv2.VideoCapture(cfg.source, cv2.CAP_GSTREAMER)
        else:  # video file, rtsp, http (MJPEG / HLS ...): FFmpeg with open/read timeouts
            cap = cv2.VideoCapture(cfg.source, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{_safe(cfg.source)}: cannot open {cfg.kind} source")
        if cfg.kind == "v4l2" and cfg.fps:
            cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        self.cap = cap
        self._name = os.path.basename(cfg.source) if cfg.kind == "video" else None
        self._pos = 0

    def read(self) -> tuple[np.ndarray, str | None] | None:
        ok, image = self.cap.read()
        if not ok or image is None:
            if not self.live:
                if self.cfg.loop and self._pos > 0:
                    self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    self._pos = 0
                    ok, image = self.cap.read()
                if not ok or image is None:
                    return None
            else:
                raise SourceError(f"{_safe(self.cfg.source)}: read failed (stream ended or timed out)")
        self._pos += 1
        name = f"{self._name}#{self._pos - 1}" if self._name else None
        return to_uint8(image, where=self.cfg.source), name

    def close(self) -> None:
        self.cap.release()


def _safe(source: str) -> str:
    """A source string for logs with any URL password masked."""
    if "://" in source and "@" in source:
        scheme, rest = source.split("://", 1)
        creds, host = rest.split("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return source


def open_reader(cfg: CameraConfig, on_unreadable: Callable[[str, Exception], None] | None = None) -> Reader:
    if cfg.kind == "directory":
        return DirectoryReader(
            cfg.source, cfg.loop, on_unreadable=on_unreadable, preload_mb=cfg.preload_mb, max_pixels=cfg.max_pixels
        )
    if cfg.kind == "gstreamer":  # PyGObject, else OpenCV's CAP_GSTREAMER where built with it
        from runtime.sources.gstreamer import open_gstreamer

        return open_gstreamer(cfg)
    return CaptureReader(cfg)


def first_frame(cfg: CameraConfig) -> str | None:
    """``serve --check``: None when a file/directory source yields a readable frame, else why not."""
    try:
        reader = open_reader(dataclasses.replace(cfg, loop=False), on_unreadable=lambda p, exc: None)
    except Exception as exc:  # SourceError, cv2.error
        return str(exc)
    try:
        item = reader.read()
        return None if item is not None else f"{_safe(cfg.source)}: no readable frame"
    except Exception as exc:
        return str(exc)
    finally:
        reader.close()


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


def list_images(path: str | os.PathLike[str]) -> list[Path]:
    """Image files of a replay directory in replay order."""
    return sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
