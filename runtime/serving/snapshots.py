"""Defect snapshots: judged frames saved as JPEG + JSON sidecar in a spool with a disk quota.

Engineers pull the spool to relabel and retrain. Writes happen on a writer
thread fed by a bounded queue (a full queue drops the snapshot, counted, and
never delays a verdict); files are written atomically (temp + rename, JPEG
first, sidecar last); when the spool exceeds its quota the oldest snapshots
are removed first. Names start with the UTC capture time, so name order is age.

A detector's snapshot keeps the frame as it was judged (``<stem>.jpg``, the image a
relabelled dataset is built from) and adds ``<stem>.boxes.jpg`` with the verdict's boxes
drawn; the sidecar (the verdict message) carries the boxes and names that file in
``boxes_image``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.config.station import SnapshotConfig
from runtime.fsio import atomic_write_bytes
from runtime.inference.boxes import draw_boxes

log = logging.getLogger("defectscope.snapshots")
BOXES_SUFFIX = ".boxes.jpg"  # the annotated copy of a detector's snapshot
SUFFIXES = (".jpg", ".json", BOXES_SUFFIX)


def _stem(name: str) -> str | None:
    """The snapshot a spool file belongs to (None: not a spool file)."""
    if name.endswith(BOXES_SUFFIX):
        return name[: -len(BOXES_SUFFIX)]
    for suffix in (".jpg", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


class SnapshotSpool:
    def __init__(self, cfg: SnapshotConfig, on_result: Callable[[str], None] = lambda result: None) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"key 'snapshots.dir': cannot create {self.dir}: {exc.strerror or exc}") from None
        self.quota = int(cfg.quota_mb * 1024 * 1024)
        self.on_result = on_result
        self._entries: deque[tuple[str, int]] = deque()  # (stem, bytes), oldest first
        self.total = 0
        self._scan()
        self._queue: queue.Queue[tuple[Path, np.ndarray, dict[str, Any]] | None] = queue.Queue(cfg.queue_size)
        self._thread = threading.Thread(target=self._run, name="snapshots", daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        sizes: dict[str, int] = {}
        for p in self.dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)  # a write interrupted by a crash
                continue
            stem = _stem(p.name)
            if stem is not None and p.is_file():
                sizes[stem] = sizes.get(stem, 0) + p.stat().st_size
        for stem in sorted(sizes):
            self._entries.append((stem, sizes[stem]))
            self.total += sizes[stem]
        self._enforce()

    def path_for(self, station: str, camera: str, seq: int, verdict: str, captured_at: float) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(captured_at)) + f"{captured_at % 1:.6f}"[1:] + "Z"
        return self.dir / f"{stamp}_{station}_{camera}_{seq:09d}_{verdict}.jpg"

    def submit(self, path: Path, image: np.ndarray, sidecar: dict[str, Any]) -> bool:
        """Queue a snapshot; False (counted 'dropped') when the writer is behind."""
        try:
            self._queue.put_nowait((path, image, sidecar))
            return True
        except queue.Full:
            self.on_result("dropped")
            return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            path, image, sidecar = item
            try:
                ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
                if not ok:
                    raise OSError("JPEG encoding failed")
                data = buf.tobytes()
                atomic_write_bytes(path, data)
                size = len(data)
                if sidecar.get("detections"):
                    boxed = path.with_name(path.stem + BOXES_SUFFIX)
                    ok, buf = cv2.imencode(
                        ".jpg",
                        draw_boxes(image, sidecar["detections"]),
                        [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality],
                    )
                    if not ok:
                        raise OSError("JPEG encoding failed")
                    atomic_write_bytes(boxed, buf.tobytes())
                    size += len(buf)
                    sidecar = dict(sidecar, boxes_image=boxed.name)
                meta = (json.dumps(sidecar, indent=1) + "\n").encode()
                atomic_write_bytes(path.with_suffix(".json"), meta)
                self._entries.append((path.stem, size + len(meta)))
                self.total += size + len(meta)
                self._enforce()
                self.on_result("saved")
            except OSError as exc:
                log.error("snapshot %s not written: %s", path.name, exc)
                self.on_result("error")

    def _enforce(self) -> None:
        while self.total > self.quota and self._entries:
            stem, size = self._entries.popleft()
            for suffix in SUFFIXES:
                (self.dir / f"{stem}{suffix}").unlink(missing_ok=True)
            self.total -= size

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish queued writes (up to ``timeout_s``) and stop the writer."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)
