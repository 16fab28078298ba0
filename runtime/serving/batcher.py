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
        self.on_drop: Callable[[Frame], None] = lambda frame: None  # a frame pushed out (releases its slot)

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
        if dropped is not None:
            self.on_drop(dropped)
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


def assemble(frames: list[Frame], out: BatchBuffers | None = None, slots: FrameSlots | None = None) -> np.ndarray:
    """Frames' (V,C,H,W) views -> one (N*V,C,H,W) batch; a frame's views stay adjacent.

    One frame: its own views, no copy. Several in consecutive slots of ``slots``: ``frames`` is put
    in slot order (capture order, so each camera's order holds) and the batch is a view of the
    arena, no copy. Otherwise copied into a reused buffer of ``out`` if given.
    """
    tensors = [f.tensor for f in frames if f.tensor is not None]
    assert len(tensors) == len(frames), "assemble() needs prepared frames"
    if len(tensors) == 1:
        return tensors[0]
    if slots is not None and all(f.slot is not None and f.slot[0] is slots for f in frames):
        frames.sort(key=lambda f: slots.ticket(f.slot[1]))  # type: ignore[index]
        view = slots.contiguous([f.slot[1] for f in frames], tensors[0].shape[0])  # type: ignore[index]
        if view is not None:
            slots.stats["zero_copy"] += 1
            return view
        slots.stats["gathered"] += 1
        tensors = [f.tensor for f in frames if f.tensor is not None]
    if out is None:
        return np.concatenate(tensors)
    rows = sum(t.shape[0] for t in tensors)
    return np.concatenate(tensors, out=out.take((rows, *tensors[0].shape[1:]), tensors[0].dtype))


class FrameSlots:
    """Zero-copy batches (``[batching] zero_copy``): one preallocated arena of frame slots per model.

    A capture thread takes a slot (``acquire``) and writes the frame's prepared views straight
    into it (``rows``); slots are handed out in ring order with a ticket, so frames prepared one
    after another sit next to each other. A batch whose frames hold consecutive slots is one view
    of the arena (``contiguous``): no per-frame allocation and no stacking copy. Anything else
    (a wrap-around, a frame dropped from a queue, the ring full) still works, by the old copy or
    allocation, and is counted in ``stats``. ``allocate`` makes the arena (the TensorRT backend
    gives page-locked host memory, so its host-to-device copy runs by DMA).
    """

    def __init__(
        self,
        n_slots: int,
        rows: tuple[int, ...],
        dtype: np.dtype | type,
        allocate: Callable[[tuple[int, ...], np.dtype | type], np.ndarray] | None = None,
    ) -> None:
        shape = (n_slots, *rows)
        self.arena = allocate(shape, dtype) if allocate is not None else np.empty(shape, dtype=dtype)
        self._free = [True] * n_slots
        self._ticket = [0] * n_slots
        self._next = 0
        self._tickets = 0
        self._lock = threading.Lock()
        # zero_copy: batches passed as an arena view; gathered: batches copied together;
        # no_slot: frames prepared into their own allocation because every slot was taken.
        self.stats = {"zero_copy": 0, "gathered": 0, "no_slot": 0}

    @property
    def n_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """The next free slot in ring order, or None when all are taken (the caller allocates)."""
        with self._lock:
            n = len(self._free)
            for k in range(n):
                i = (self._next + k) % n
                if self._free[i]:
                    self._free[i] = False
                    self._tickets += 1
                    self._ticket[i] = self._tickets
                    self._next = (i + 1) % n
                    return i
            self.stats["no_slot"] += 1
            return None

    def release(self, slot: int) -> None:
        with self._lock:
            self._free[slot] = True

    def in_use(self) -> int:
        with self._lock:
            return self._free.count(False)

    def ticket(self, slot: int) -> int:
        return self._ticket[slot]

    def contiguous(self, slots: Sequence[int], rows: int) -> np.ndarray | None:
        """The arena rows of ``slots`` (in this order, each holding ``rows`` views) as one (N*rows, ...) view,
        or None when they are not consecutive slots."""
        first = slots[0]
        if any(s != first + k for k, s in enumerate(slots)) or first + len(slots) > self.n_slots:
            return None
        block = self.arena[first : first + len(slots), :rows]
        if rows != self.arena.shape[1] and len(slots) > 1:
            return None  # fewer views than the slot holds: the rows are not adjacent
        return block.reshape(-1, *self.arena.shape[2:])


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
