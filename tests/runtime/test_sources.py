"""Capture: frame hub policies, backoff, transforms, replays, and a live MJPEG camera that
disappears and comes back while another camera keeps flowing."""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.config.station import CameraConfig, load_config
from runtime.serving.batcher import FrameHub
from runtime.serving.daemon import Daemon
from runtime.sources.cameras import Camera, Frame, backoff_delay, transform
from runtime.sources.readers import DirectoryReader, SourceError

from ._helpers import Subscriber, free_port, http_get, make_bundle, make_images, metric, scrape, station_config


def _frame(cam: str, seq: int) -> Frame:
    return Frame(cam, seq, np.zeros((4, 4), np.uint8), time.time(), time.monotonic())


def test_hub_drops_oldest_when_full_and_batches_round_robin() -> None:
    hub = FrameHub()
    hub.add_camera("a", 3)
    hub.add_camera("b", 3)
    stop = threading.Event()
    dropped = [hub.put(_frame("a", i), block=False, stop=stop) for i in range(5)]
    assert [d.seq if d else None for d in dropped] == [None, None, None, 0, 1]
    hub.put(_frame("b", 0), block=False, stop=stop)
    batch = hub.get_batch(max_frames=3, max_wait_s=0.0, timeout_s=0.1)
    assert [(f.camera, f.seq) for f in batch] == [("a", 2), ("b", 0), ("a", 3)]
    assert [f.seq for f in hub.get_batch(8, 0.0, 0.1)] == [4]
    assert hub.get_batch(8, 0.0, 0.05) == []


def test_hub_waits_up_to_max_wait_for_a_full_batch() -> None:
    hub = FrameHub()
    hub.add_camera("a", 10)
    stop = threading.Event()
    hub.put(_frame("a", 0), block=False, stop=stop)
    threading.Timer(0.05, lambda: hub.put(_frame("a", 1), block=False, stop=stop)).start()
    batch = hub.get_batch(max_frames=2, max_wait_s=2.0, timeout_s=1.0)
    assert [f.seq for f in batch] == [0, 1]  # the second frame arrived within max_wait and joined


def test_hub_asks_for_the_batching_wait_only_once_a_frame_is_there() -> None:
    # The engine's state when the first frame arrives decides the wait, not its state when the
    # wait for a frame began (an engine busy then may be idle by the time a lone frame comes).
    hub = FrameHub()
    hub.add_camera("a", 10)
    stop = threading.Event()
    busy = threading.Event()
    busy.set()
    asked: list[bool] = []

    def wait_s() -> float:
        asked.append(busy.is_set())
        return 2.0 if busy.is_set() else 0.0

    def arrive() -> None:
        busy.clear()  # the engine finished before the frame came
        hub.put(_frame("a", 0), block=False, stop=stop)

    threading.Timer(0.05, arrive).start()
    t0 = time.monotonic()
    batch = hub.get_batch(max_frames=8, max_wait_s=wait_s, timeout_s=1.0)
    assert [f.seq for f in batch] == [0]
    assert asked == [False]
    assert time.monotonic() - t0 < 1.0  # a fixed wait decided at the start would have taken 2 s


def test_hub_block_policy_waits_for_room_and_stop_releases_it() -> None:
    hub = FrameHub()
    hub.add_camera("a", 1)
    stop = threading.Event()
    hub.put(_frame("a", 0), block=True, stop=stop)
    done = threading.Event()
    t = threading.Thread(target=lambda: (hub.put(_frame("a", 1), block=True, stop=stop), done.set()))
    t.start()
    assert not done.wait(0.2)  # blocked: the replay waits instead of dropping
    assert [f.seq for f in hub.get_batch(1, 0.0, 0.1)] == [0]
    assert done.wait(2.0)
    t2 = threading.Thread(target=lambda: hub.put(_frame("a", 2), block=True, stop=stop))
    t2.start()
    time.sleep(0.1)
    stop.set()  # stopping: the frame is still queued so the drain infers it
    t2.join(2.0)
    assert not t2.is_alive()
    assert [f.seq for f in hub.get_batch(5, 0.0, 0.1)] == [1, 2]


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(i, 0.5, 8.0, rng) for i in range(8)]
    for i, d in enumerate(delays):
        base = min(8.0, 0.5 * 2**i)
        assert base / 2 <= d <= base
    assert len({round(backoff_delay(3, 0.5, 8.0, rng), 6) for _ in range(20)}) > 1  # jitter


def test_transform_rotates_then_crops() -> None:
    img = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4)
    cfg = CameraConfig(id="c", source="0", kind="v4l2", rotate=90, roi=(1, 0, 2, 3))
    out = transform(img, cfg)
    np.testing.assert_array_equal(out, cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)[0:3, 1:3])


def test_directory_reader_loops_and_skips_unreadable(tmp_path: Path) -> None:
    make_images(tmp_path, ["ok", "defect"])
    (tmp_path / "zz_broken.png").write_bytes(b"not a png")
    r = DirectoryReader(str(tmp_path), loop=True)
    names = [r.read()[1] for _ in range(4)]
    assert names == ["frame_00000.png", "frame_00001.png", "frame_00000.png", "frame_00001.png"]
    once = DirectoryReader(str(tmp_path), loop=False)
    assert [once.read()[1] for _ in range(2)] == ["frame_00000.png", "frame_00001.png"]
    assert once.read() is None


def test_directory_reader_counts_unreadable_files_and_never_spins_on_a_broken_replay(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    skipped: list[str] = []
    r = DirectoryReader(str(tmp_path), loop=True, on_unreadable=lambda p, exc: skipped.append(Path(p).name))
    with pytest.raises(SourceError, match="none of the 2 image files is readable"):
        r.read()  # a looping replay of nothing readable fails (the camera backs off) instead of looping forever
    assert skipped == ["a.png", "b.png"]
    r.close()


def test_directory_reader_preloads_once_and_replays_read_only_frames(tmp_path: Path) -> None:
    make_images(tmp_path, ["ok", "defect"])
    (tmp_path / "zz_broken.png").write_bytes(b"not a png")
    skipped: list[str] = []
    r = DirectoryReader(str(tmp_path), loop=True, preload_mb=1.0, on_unreadable=lambda p, e: skipped.append(p))
    (tmp_path / "frame_00000.png").unlink()  # decoded already: the replay no longer touches the disk
    got = [r.read() for _ in range(4)]
    assert [g[1] for g in got] == ["frame_00000.png", "frame_00001.png"] * 2
    assert len(skipped) == 1 and skipped[0].endswith("zz_broken.png")
    assert not got[0][0].flags.writeable and got[0][0] is got[2][0]  # one decoded copy, shared safely
    once = DirectoryReader(str(tmp_path), loop=False, preload_mb=1.0)
    assert [once.read()[1] for _ in range(1)] == ["frame_00001.png"] and once.read() is None


def test_directory_reader_refuses_a_preload_beyond_its_budget_naming_the_file(tmp_path: Path) -> None:
    make_images(tmp_path, ["ok"] * 4, size=(300, 300))  # 90 kB decoded each: the 4th passes 0.3 MB
    with pytest.raises(SourceError, match=r"frame_00003\.png: preloading .* more than preload_mb = 0\.3 MB"):
        DirectoryReader(str(tmp_path), loop=False, preload_mb=0.3)


def test_preload_is_refused_for_live_sources(tmp_path: Path) -> None:
    from runtime.config.station import ConfigError

    path = tmp_path / "s.toml"
    path.write_text('[model]\nbundle="b"\n[[cameras]]\nid="c"\nsource="0"\npreload_mb=64\n')
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.preload_mb.*only directory replays"):
        load_config(path)


def test_daemon_serves_a_preloaded_replay(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    verdicts = ["ok", "defect", "ok", "defect", "defect"]
    make_images(tmp_path / "replay", verdicts)
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "r", "source": str(tmp_path / "replay"), "preload_mb": 4.0}],
        publisher={"wait_for_subscribers": 1},
    )
    sub = Subscriber(endpoint)
    d = Daemon(load_config(config))
    try:
        d.start()
        assert d.run() == 0
        sub.until(lambda s: len(s.verdicts()) == 5, 10, what="5 preloaded frames")
        assert [m["verdict"] for m in sub.verdicts()] == verdicts
    finally:
        d.shutdown()
        sub.close()


class _Events:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def captured(self, camera: str, at: float) -> None:
        self.log.append(("captured", camera))

    def dropped(self, camera: str, reason: str, n: int = 1) -> None:
        self.log.append(("dropped", reason))

    def up(self, camera: str, up: bool) -> None:
        self.log.append(("up", up))

    def reconnect_attempt(self, camera: str) -> None:
        self.log.append(("attempt", camera))

    def reconnected(self, camera: str) -> None:
        self.log.append(("reconnected", camera))


def test_live_camera_drops_oldest_never_blocks(tmp_path: Path) -> None:
    make_images(tmp_path / "r", ["ok"] * 5)
    cfg = CameraConfig(
        id="c", source=str(tmp_path / "r"), kind="directory", loop=True, queue_size=2, on_full="drop_oldest"
    )
    hub, events = FrameHub(), _Events()
    cam = Camera(cfg, hub, events)
    cam.start()
    deadline = time.monotonic() + 5
    while ("dropped", "queue_full") not in events.log and time.monotonic() < deadline:
        time.sleep(0.01)
    cam.stop()
    assert cam.join(3)
    assert ("dropped", "queue_full") in events.log  # nobody consumed: old frames went, capture went on
    batch = hub.get_batch(10, 0.0, 0.1)
    assert len(batch) == 2 and batch[0].seq < batch[1].seq == cam.seq - 1  # the newest frames were kept


# ---- a live MJPEG-over-HTTP camera on loopback ----------------------------------------------------
class MJPEGServer:
    """multipart/x-mixed-replace JPEG stream; stop() closes every connection, start() serves again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.httpd: ThreadingHTTPServer | None = None
        self.alive = threading.Event()

    def start(self) -> None:
        alive = self.alive
        alive.set()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while alive.is_set():
                        img = np.full((48, 48, 3), 215 if i % 2 else 40, np.uint8)
                        ok, buf = cv2.imencode(".jpg", img)
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(buf)
                            + buf.tobytes()
                            + b"\r\n"
                        )
                        i += 1
                        time.sleep(0.04)
                except OSError:
                    pass
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.alive.clear()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        self.alive = threading.Event()


def test_camera_disappears_and_comes_back_while_other_keeps_flowing(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    make_images(tmp_path / "replay", ["ok", "defect"])
    port = free_port()
    server = MJPEGServer(port)
    server.start()
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [
            {
                "id": "live",
                "source": f"http://127.0.0.1:{port}/stream.mjpg",
                "read_timeout_s": 1.0,
                "reconnect_initial_s": 0.2,
                "reconnect_max_s": 0.5,
            },
            {"id": "replay", "source": str(tmp_path / "replay"), "loop": True, "fps": 20.0},
        ],
        metrics={"ready_max_frame_age_s": 1.0},
    )
    sub = Subscriber(endpoint)
    d = Daemon(load_config(config))
    try:
        d.start()
        t = threading.Thread(target=d.run, daemon=True)
        t.start()
        base = f"http://127.0.0.1:{d.http.port}"
        sub.until(
            lambda s: len(s.verdicts("live")) >= 3 and len(s.verdicts("replay")) >= 3, 20, what="both cameras flowing"
        )
        assert {m["verdict"] for m in sub.verdicts("live")} <= {"ok", "defect"}

        server.stop()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, body = http_get(base + "/readyz")
            if not json.loads(body)["cameras"]["live"]["up"]:
                break
            sub.pump(0.1)
        ready = json.loads(body)
        # A camera down is reported, not "not ready": the model still serves the other camera.
        assert status == 200 and ready["ready"] is True and ready["cameras"]["live"]["up"] is False
        assert ready["cameras"]["replay"]["up"] is True
        assert metric(scrape(base + "/metrics"), "defectscope_camera_up", camera="live") == 0
        sub.pump(0.2)
        live_before = len(sub.verdicts("live"))
        replay_before = len(sub.verdicts("replay"))
        sub.until(lambda s: len(s.verdicts("replay")) >= replay_before + 10, 10, what="replay flowing during outage")
        assert len(sub.verdicts("live")) == live_before  # nothing from the dead camera meanwhile

        server.start()
        sub.until(lambda s: len(s.verdicts("live")) >= live_before + 3, 20, what="live camera back")
        seqs = [m["seq"] for m in sub.verdicts("live")]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # sequence continues, no reuse
        samples = scrape(base + "/metrics")
        # One outage, one successful reconnection; the failed attempts in between are counted apart.
        assert metric(samples, "defectscope_camera_reconnects_total", camera="live") == 1
        assert metric(samples, "defectscope_camera_reconnect_attempts_total", camera="live") >= 1
        assert metric(samples, "defectscope_camera_reconnects_total", camera="replay") == 0
        assert metric(samples, "defectscope_camera_up", camera="live") == 1
        d.request_stop()
        t.join(20)
        assert not t.is_alive()
    finally:
        d.shutdown()
        server.stop()
        sub.close()


@pytest.mark.parametrize("kind", ["video"])
def test_video_file_replay(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 40))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG AVI")
    for level in (40, 215, 40, 215):
        writer.write(np.full((40, 48, 3), level, np.uint8))
    writer.release()
    bundle = make_bundle(tmp_path / "bundle")
    config, endpoint = station_config(
        tmp_path, bundle, [{"id": "vid", "source": str(path)}], publisher={"wait_for_subscribers": 1}
    )
    sub = Subscriber(endpoint)
    d = Daemon(load_config(config))
    try:
        d.start()
        assert d.run() == 0
        sub.until(lambda s: len(s.verdicts()) == 4, 10, what="4 video frames")
        assert [m["verdict"] for m in sub.verdicts()] == ["ok", "defect", "ok", "defect"]
        assert sub.verdicts()[1]["source"] == "clip.avi#1"
    finally:
        d.shutdown()
        sub.close()


def test_assemble_reuses_its_buffers_and_keeps_each_frames_views_adjacent() -> None:
    from runtime.serving.batcher import BatchBuffers, assemble

    rng = np.random.default_rng(0)
    frames = [_frame("c", i) for i in range(3)]
    for f in frames:
        f.tensor = rng.random((2, 3, 4, 4), dtype=np.float32)  # 2 views
    ring = BatchBuffers(slots=2)
    first = assemble(frames, ring)
    np.testing.assert_array_equal(first, np.concatenate([f.tensor for f in frames]))
    second = assemble(frames[:2], ring)
    third = assemble(frames, ring)
    assert np.shares_memory(first, third) and not np.shares_memory(first, second)  # the ring wrapped
    np.testing.assert_array_equal(third, np.concatenate([f.tensor for f in frames]))
    assert assemble(frames[:1], ring) is frames[0].tensor  # one frame: no copy at all
