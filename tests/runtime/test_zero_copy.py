"""Zero-copy batches ([batching] zero_copy): capture threads prepare frames into slots of one arena,
a batch of consecutive slots goes to the engine as a view of it (no stacking copy), anything else
falls back to the copy; slots come back after inference and when a queue drops a frame; the daemon
gives the same verdicts with it on."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.config.station import load_config
from runtime.inference.model import load_model, release
from runtime.serving.batcher import FrameHub, FrameSlots, assemble
from runtime.serving.daemon import Daemon
from runtime.sources.cameras import Frame

from ._helpers import Subscriber, brightness, make_bundle, make_images, station_config

PATTERN = ["ok", "defect", "uncertain", "ok", "defect"]


def _frame(seq: int, level: int = 40, camera: str = "cam1") -> Frame:
    img = np.full((40, 48), level, dtype=np.uint8)
    return Frame(camera=camera, seq=seq, image=img, captured_at=time.time(), t_capture=time.monotonic())


@pytest.fixture
def model(tmp_path: Path):
    bundle = make_bundle(tmp_path / "bundle")
    (tmp_path / "replay").mkdir()
    config, _ = station_config(
        tmp_path, bundle, [{"id": "cam1", "source": str(tmp_path / "replay")}], batching={"zero_copy": True}
    )
    m = load_model(load_config(config))
    yield m
    m.close()


def test_slots_hand_out_ring_order_and_refuse_when_full() -> None:
    slots = FrameSlots(3, (1, 2), np.float32)
    assert [slots.acquire(), slots.acquire(), slots.acquire()] == [0, 1, 2]
    assert slots.acquire() is None and slots.stats["no_slot"] == 1
    slots.release(1)
    assert slots.acquire() == 1 and slots.in_use() == 3
    assert slots.contiguous([0, 1, 2], 1) is not None and slots.contiguous([1, 2, 0], 1) is None


def test_consecutive_slots_are_one_view_of_the_arena_no_copy(model) -> None:
    assert model.slots is not None
    frames = [_frame(i, level=40 + 40 * i) for i in range(3)]
    for f in frames:
        model.prepare(f)
    batch = model.stack(list(reversed(frames)))  # taken in another order: put back in capture order
    assert np.shares_memory(batch, model.slots.arena) and model.slots.stats["zero_copy"] == 1
    ref = model.pre.batch([f.image for f in frames])
    np.testing.assert_array_equal(batch, ref)
    (got,) = model.backend.run(batch)
    (want,) = model.backend.run(ref)
    np.testing.assert_array_equal(got, want)
    for f in frames:
        release(f)
    assert model.slots.in_use() == 0 and all(f.tensor is None and f.slot is None for f in frames)


def test_a_gap_in_the_slots_falls_back_to_the_copy_with_the_same_batch(model) -> None:
    frames = [_frame(i, level=30 + 50 * i) for i in range(4)]
    for f in frames:
        model.prepare(f)
    kept = [frames[0], frames[2], frames[3]]  # frame 1 was dropped: its slot is a hole
    release(frames[1])
    batch = model.stack(kept)
    assert not np.shares_memory(batch, model.slots.arena) and model.slots.stats["gathered"] == 1
    np.testing.assert_array_equal(batch, model.pre.batch([f.image for f in kept]))


def test_a_full_arena_allocates_instead_of_failing(model) -> None:
    frames = [_frame(i) for i in range(model.slots.n_slots + 2)]
    for f in frames:
        model.prepare(f)
    assert model.slots.in_use() == model.slots.n_slots and model.slots.stats["no_slot"] == 2
    assert frames[-1].slot is None and frames[-1].tensor is not None
    np.testing.assert_array_equal(model.stack(frames[-2:]), model.pre.batch([f.image for f in frames[-2:]]))


def test_a_frame_dropped_from_its_queue_gives_its_slot_back(model) -> None:
    hub = FrameHub()
    hub.on_drop = release
    hub.add_camera("cam1", 1)
    a, b = _frame(0), _frame(1)
    model.prepare(a)
    hub.put(a, False, threading.Event())
    model.prepare(b)
    assert hub.put(b, False, threading.Event()) is a  # drop-oldest
    assert a.slot is None and model.slots.in_use() == 1


def test_assemble_without_slots_is_unchanged() -> None:
    frames = [_frame(i) for i in range(2)]
    for i, f in enumerate(frames):
        f.tensor = np.full((1, 3, 2, 2), i, np.float32)
    np.testing.assert_array_equal(assemble(frames)[:, 0, 0, 0], [0, 1])


def test_daemon_with_zero_copy_gives_the_same_verdicts_and_returns_every_slot(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    verdicts = PATTERN * 4
    cams = []
    for cam in ("cam1", "cam2"):
        make_images(tmp_path / cam, verdicts)
        cams.append({"id": cam, "source": str(tmp_path / cam)})
    config, endpoint = station_config(
        tmp_path,
        bundle,
        cams,
        batching={"zero_copy": True, "max_batch": 4},
        publisher={"wait_for_subscribers": 1, "wait_timeout_s": 10.0},
    )
    sub = Subscriber(endpoint)
    d = Daemon(load_config(config), config_path=config)
    try:
        d.start()
        assert d.run() == 0
        sub.until(lambda s: any(m["state"] == "stopped" for m in s.statuses()), 10, what="final status")
        for cam in ("cam1", "cam2"):
            msgs = sub.verdicts(cam)
            assert [m["seq"] for m in msgs] == list(range(len(verdicts)))
            assert [m["verdict"] for m in msgs] == verdicts
        model = d.pipeline.model
        assert model is not None and model.slots is not None and model.slots.in_use() == 0
    finally:
        d.shutdown()
        sub.close()
    assert brightness("ok") < brightness("defect")
