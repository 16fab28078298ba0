"""runtime/serving/preview.py: rate cap per camera, downscale, off by default, own topic, subscriber-side checks."""

from __future__ import annotations

import base64
import time

import cv2
import numpy as np
import pytest
import zmq

from runtime.serving.messages import SchemaError, decode, encode, validate
from runtime.serving.preview import PREVIEW_PREFIX, PreviewConfig, PreviewEncoder, decode_preview, preview_topic


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def frame(w=1280, h=960, level=120):
    return np.full((h, w, 3), level, np.uint8)


def test_off_by_default():
    enc = PreviewEncoder(PreviewConfig(), "st1")
    assert PreviewConfig().enabled is False
    assert enc.offer("cam1", frame(), 1, time.time()) is None and enc.encoded == 0


def test_rate_cap_is_per_camera():
    clock = Clock()
    enc = PreviewEncoder(PreviewConfig(enabled=True, max_fps=2.0), "st1", clock=clock)
    sent = []
    for i in range(300):  # 3 s of a 100 fps camera pair
        for cam in ("cam1", "cam2"):
            got = enc.offer(cam, frame(64, 48), i, 0.0)
            if got:
                sent.append((cam, clock.t))
        clock.t += 0.01
    per_cam = {c: [t for cc, t in sent if cc == c] for c in ("cam1", "cam2")}
    assert all(len(v) == 6 for v in per_cam.values()), per_cam  # 2 fps x 3 s
    assert all(b - a >= 0.5 - 1e-9 for v in per_cam.values() for a, b in zip(v, v[1:]))
    assert enc.skipped == 600 - 12


def test_downscaled_jpeg_with_schema_fields():
    enc = PreviewEncoder(PreviewConfig(enabled=True, max_width=320, jpeg_quality=60), "st1")
    topic, msg = enc.offer("cam1", frame(1280, 960), 42, 1700000000.25)
    assert topic == "_preview.st1.cam1" == preview_topic("st1", "cam1")
    assert (msg["width"], msg["height"], msg["seq"], msg["type"]) == (320, 240, 42, "preview")
    jpeg = decode_preview(decode(encode(msg)))
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (240, 320, 3) and abs(int(img.mean()) - 120) <= 2
    small = enc.offer("cam2", frame(100, 80), 1, 0.0)[1]
    assert (small["width"], small["height"]) == (100, 80)  # never upscaled
    gray = enc.offer("cam3", np.zeros((40, 60), np.uint8), 1, 0.0)[1]  # mono cameras
    assert decode_preview(gray)[:2] == b"\xff\xd8"


def test_verdict_decoders_reject_preview_messages():
    msg = PreviewEncoder(PreviewConfig(enabled=True), "st1").offer("cam1", frame(64, 48), 1, 0.0)[1]
    with pytest.raises(SchemaError, match="type"):
        validate(msg)


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda m: m.update(type="verdict"), "type"),
        (lambda m: m.update(seq="1"), "seq"),
        (lambda m: m.update(jpeg="!!!not base64"), "jpeg"),
        (lambda m: m.update(jpeg=base64.b64encode(b"GIF89a....").decode()), "jpeg"),
        (lambda m: m.update(jpeg="A" * (700 * 1024)), "jpeg"),
        (lambda m: m.pop("station"), "station"),
    ],
)
def test_forged_previews_are_refused(mutate, key):
    msg = PreviewEncoder(PreviewConfig(enabled=True), "st1").offer("cam1", frame(64, 48), 1, 0.0)[1]
    mutate(msg)
    with pytest.raises(SchemaError, match=key):
        decode_preview(msg)


@pytest.mark.parametrize(
    "table, key",
    [
        ({"max_fps": 0}, "max_fps"),
        ({"max_fps": 100}, "max_fps"),
        ({"max_width": 8}, "max_width"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"enabled": "yes"}, "enabled"),
        ({"fps": 2}, "fps"),
        ({"max_width": 320.5}, "max_width"),
    ],
)
def test_config_errors_name_the_key(table, key):
    with pytest.raises(ValueError, match=f"preview.{key}"):
        PreviewConfig.from_dict(table)
    assert PreviewConfig.from_dict({"enabled": True, "max_fps": 1}).max_fps == 1


def test_station_prefix_subscribers_never_see_previews():
    """A real PUB/SUB pair: `st1.` subscribers get verdicts only; `_preview.st1.` gets the previews."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("tcp://127.0.0.1:0")
    ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    verdict_sub, preview_sub = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
    verdict_sub.setsockopt_string(zmq.SUBSCRIBE, "st1.")
    preview_sub.setsockopt_string(zmq.SUBSCRIBE, PREVIEW_PREFIX + "st1.")
    for s in (verdict_sub, preview_sub):
        s.connect(ep)
    enc = PreviewEncoder(PreviewConfig(enabled=True, max_fps=30), "st1")
    got = {"v": [], "p": []}
    deadline = time.monotonic() + 10
    i = 0
    while (not got["v"] or not got["p"]) and time.monotonic() < deadline:
        i += 1
        pub.send_multipart([b"st1.cam1.ok", b'{"n": %d}' % i])
        topic, msg = enc.offer(f"cam{i}", frame(64, 48), i, 0.0)
        pub.send_multipart([topic.encode(), encode(msg)])
        time.sleep(0.02)
        for sock, key in ((verdict_sub, "v"), (preview_sub, "p")):
            while sock.poll(0):
                got[key].append(sock.recv_multipart()[0])
    assert got["v"] and got["p"]
    assert all(t.startswith(b"st1.") for t in got["v"]) and all(t.startswith(b"_preview.st1.") for t in got["p"])
    for s in (pub, verdict_sub, preview_sub):
        s.close(0)
    ctx.term()
