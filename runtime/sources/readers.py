"""Frame readers of a camera source: image-directory replay (prefetched, optionally preloaded), OpenCV
capture (files, RTSP/HTTP streams, V4L2 devices), and the choice between them (GStreamer pipelines:
``runtime.sources.gstreamer``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from runtime.config.station import CameraConfig
from runtime.inference.preprocess import ImageReadError, read_image, to_uint8

log = logging.getLogger("defectscope.sources")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class SourceError(RuntimeError):
    """A source that cannot be opened or stopped delivering (the camera thread will retry)."""


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


def list_images(path: str | os.PathLike[str]) -> list[Path]:
    """Image files of a replay directory in replay order."""
    return sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
