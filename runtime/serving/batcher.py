"""Micro-batching across cameras: bounded per-camera queues with one wait point.

The inference thread takes up to ``max_batch`` frames round-robin across the
cameras (so a busy camera cannot starve a quiet one), waiting at most
``max_wait`` after the first frame for the batch to fill; each frame carries
its TTA views, and :func:`assemble` stacks all views of all frames into the
one tensor batch of the inference call.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from runtime.sources.cameras import Frame


class FrameHub:
    """Bounded per-camera queues with a single wait point for the batcher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._queues: dict[str, deque[Frame]] = {}
        self._capacity: dict[str, int] = {}
        self._order: list[str] = []
        self._rr = 0
        self.on_depth: Callable[[str, int], None] = lambda camera, depth: None

    def add_camera(self, camera: str, capacity: int) -> None:
        with self._lock:
            self._queues[camera] = deque()
            self._capacity[camera] = capacity
            self._order.append(camera)

    def put(self, frame: Frame, block: bool, stop: threading.Event) -> Frame | None:
        """Enqueue; returns the frame dropped to make room (drop-oldest), else None.

        With ``block`` the caller waits for room instead (replays); a set ``stop``
        ends the wait and the frame is queued anyway, so the drain still infers it.
        """
        with self._lock:
            q = self._queues[frame.camera]
            cap = self._capacity[frame.camera]
            dropped = None
            if len(q) >= cap:
                if block:
                    while len(q) >= cap and not stop.is_set():
                        self._not_full.wait(0.1)
                else:
                    dropped = q.popleft()
            q.append(frame)
            depth = len(q)
            self._not_empty.notify()
        self.on_depth(frame.camera, depth)
        return dropped

    def pending(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def get_batch(self, max_frames: int, max_wait_s: float | Callable[[], float], timeout_s: float) -> list[Frame]:
        """Up to ``max_frames`` frames, round-robin across cameras.

        Waits up to ``timeout_s`` for a first frame, then up to ``max_wait_s`` more
        for the batch to fill. A callable ``max_wait_s`` is asked only once the first
        frame is there (whether to wait depends on the engine's state at that moment,
        not when the wait began). Returns [] on timeout.
        """
        with self._lock:
            if not self._wait_for(lambda n: n > 0, timeout_s):
                return []
            wait_s = max_wait_s() if callable(max_wait_s) else max_wait_s
            if wait_s > 0 and max_frames > 1:
                self._wait_for(lambda n: n >= max_frames, wait_s)
            batch: list[Frame] = []
            cams = self._order
            idle = 0
            while len(batch) < max_frames and idle < len(cams):
                cam = cams[self._rr % len(cams)]
                self._rr += 1
                q = self._queues[cam]
                if q:
                    batch.append(q.popleft())
                    idle = 0
                else:
                    idle += 1
            depths = {cam: len(self._queues[cam]) for cam in cams}
            self._not_full.notify_all()
        for cam, depth in depths.items():
            self.on_depth(cam, depth)
        return batch

    def _wait_for(self, predicate: Callable[[int], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            n = sum(len(q) for q in self._queues.values())
            if predicate(n):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._not_empty.wait(remaining)

    def wake(self) -> None:
        with self._lock:
            self._not_empty.notify_all()
            self._not_full.notify_all()


def assemble(frames: Sequence[Frame], out: BatchBuffers | None = None) -> np.ndarray:
    """Frames' (V,C,H,W) views -> one (N*V,C,H,W) float32 batch; a frame's views stay adjacent.

    One frame: its own views, no copy. Several: copied into a reused buffer of ``out`` if given.
    """
    tensors = [f.tensor for f in frames if f.tensor is not None]
    assert len(tensors) == len(frames), "assemble() needs prepared frames"
    if len(tensors) == 1:
        return tensors[0]
    if out is None:
        return np.concatenate(tensors)
    rows = sum(t.shape[0] for t in tensors)
    return np.concatenate(tensors, out=out.take((rows, *tensors[0].shape[1:]), tensors[0].dtype))


class BatchBuffers:
    """A ring of preallocated batch buffers, so stacking a batch allocates (and page-faults) nothing.

    ``slots`` must exceed the batches alive at once: with the pipeline's hand-over queue of one,
    one batch in the backend, one queued and one being stacked, hence 3. The backends copy their
    input during ``run`` (ONNX Runtime, TensorRT's host-to-device copy), so a buffer is free when
    its call returns.
    """

    def __init__(self, slots: int = 3) -> None:
        self._bufs: list[np.ndarray | None] = [None] * slots
        self._next = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
        i = self._next
        self._next = (i + 1) % len(self._bufs)
        buf = self._bufs[i]
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if buf is None or buf.size < nbytes:
            buf = self._bufs[i] = np.empty(nbytes, dtype=np.uint8)  # bytes: float32 and uint8 batches share it
        return buf[:nbytes].view(dtype).reshape(shape)
