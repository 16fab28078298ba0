"""Decompression bombs (issue 25 item 3): image sizes are read from the header and checked against
``[[cameras]] max_pixels`` before anything is decoded; the bomb is refused alone (``too_large``)."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.inference.image_header import HeaderError, header_size
from runtime.inference.preprocess import ImageReadError, ImageTooLarge, read_image

from ._helpers import Subscriber, make_bundle, make_images, metric, scrape, station_config
from .test_pipeline import run_in_thread, start_daemon  # noqa: F401  (fixture)

MiB = 1 << 20


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(path: Path, width: int = 8000, height: int = 8000, rows: int | None = None) -> Path:
    """A 16-bit gray PNG declaring ``width`` x ``height``, streamed row by row (never held in memory);
    ``rows`` (default ``height``) rows of pixel data follow."""
    z = zlib.compressobj(9)
    row = b"\x00" + b"\x5a" * (width * 2)  # filter byte + 16-bit samples
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)))
        for _ in range(height if rows is None else rows):
            if data := z.compress(row):
                f.write(_chunk(b"IDAT", data))
        f.write(_chunk(b"IDAT", z.flush()) + _chunk(b"IEND", b""))
    return path


def _rss() -> int:
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (proc(5))


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp", ".pgm", ".ppm"])
def test_header_size_is_what_the_decoder_decodes(ext: str) -> None:
    for shape in ((37, 53), (53, 37, 3)):
        if ext == ".pgm" and len(shape) == 3 or ext == ".ppm" and len(shape) == 2:
            continue
        ok, data = cv2.imencode(ext, np.full(shape, 120, np.uint8))
        assert ok
        assert header_size(data.tobytes()) == (shape[1], shape[0]), ext
    ok, data = cv2.imencode(".tiff", np.full((21, 34), 999, np.uint16))
    assert header_size(data.tobytes()) == (34, 21)


def test_a_bomb_png_is_small_on_disk(tmp_path: Path) -> None:
    path = bomb_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 1 * MiB
    assert header_size(path.read_bytes()) == (8000, 8000)


def test_forged_headers_are_refused_without_decoding(tmp_path: Path) -> None:
    """Claims huge (never decoded), lies about its format, is truncated, or is longer than any
    accepted image could be: each refused with a reason, the process stays small."""
    huge = bomb_png(tmp_path / "huge.png", 100_000, 100_000, rows=1)  # IHDR only claims 10^10 pixels
    _reset_peak()
    before = _rss()
    with pytest.raises(ImageTooLarge, match="100000x100000 image is larger than max_pixels"):
        read_image(huge, max_pixels=40_000_000)
    (tmp_path / "trunc.png").write_bytes(huge.read_bytes()[:20])
    with pytest.raises(ImageReadError, match="truncated image header") as info:
        read_image(tmp_path / "trunc.png", max_pixels=40_000_000)
    assert not isinstance(info.value, ImageTooLarge)
    (tmp_path / "odd.png").write_bytes(b"#?RADIANCE\n" + b"\x00" * 100)  # a format not sized: not decoded
    with pytest.raises(ImageReadError, match="not a PNG, JPEG"):
        read_image(tmp_path / "odd.png", max_pixels=40_000_000)
    long = tmp_path / "long.png"
    long.write_bytes(huge.read_bytes()[:33] + b"\x00" * (3 * MiB))
    with pytest.raises(ImageTooLarge, match="bytes is more than any image of at most 100000 pixels"):
        read_image(long, max_pixels=100_000)
    assert _status("VmHWM") - before < 16 * MiB
    with pytest.raises(HeaderError):
        header_size(b"\xff\xd8\xff\xda")  # a scan before any frame header


def test_a_header_that_claims_small_decodes_small(tmp_path: Path) -> None:
    """Claims 64x64, carries 8000 rows of 8000 pixels: the decoder allocates what the header says."""
    z = zlib.compressobj(9)
    data = b"".join(z.compress(b"\x00" * 16001) for _ in range(8000)) + z.flush()  # 8000 rows of 8000 px
    liar = tmp_path / "liar.png"
    liar.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 16, 0, 0, 0, 0))
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )
    _reset_peak()
    before = _rss()
    try:
        image = read_image(liar, max_pixels=40_000_000)
        assert image.shape == (64, 64)
    except ImageReadError:
        pass  # refusing it is as good
    assert _status("VmHWM") - before < 32 * MiB


@pytest.mark.parametrize("preload_mb", [0.0, 16.0])
def test_a_decompression_bomb_in_a_replay_is_refused_alone(
    tmp_path: Path,
    start_daemon,  # noqa: F811  (the fixture)
    preload_mb,
    caplog,
) -> None:
    """Attack: a 0.5 MiB 8000x8000 16-bit PNG in a replay directory took the daemon to 2.5 GiB and
    was judged. Now it is refused from its header (too_large, logged), memory stays flat, and every
    other frame is judged."""
    replay = tmp_path / "replay"
    make_images(replay, ["ok", "defect", "ok"])
    bomb_png(replay / "frame_00001_bomb.png")
    config, endpoint = station_config(
        tmp_path,
        make_bundle(tmp_path / "bundle"),
        [{"id": "cam1", "source": str(replay), "preload_mb": preload_mb}],
        publisher={"wait_for_subscribers": 1, "wait_timeout_s": 10.0},
        daemon={"exit_when_sources_end": False},
    )
    sub = Subscriber(endpoint)
    try:
        _reset_peak()
        before = _rss()
        d = start_daemon(config)
        base = f"http://127.0.0.1:{d.http.port}"
        t, _ = run_in_thread(d)
        sub.until(lambda s: len(s.verdicts()) >= 3, 30, what="the three good frames judged")
        deadline = time.monotonic() + 10
        while not d.cameras[0].finished.is_set():
            assert time.monotonic() < deadline, "replay did not finish"
            time.sleep(0.05)
        samples = scrape(base + "/metrics")
        peak = _status("VmHWM") - before
        d.request_stop()
        t.join(30)
    finally:
        sub.close()
    assert sorted(m["source"] for m in sub.verdicts()) == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert metric(samples, "defectscope_frames_dropped_total", camera="cam1", reason="too_large") == 1
    assert metric(samples, "defectscope_frames_dropped_total", camera="cam1", reason="decode_error") == 0
    assert any("8000x8000 image is larger than max_pixels" in r.getMessage() for r in caplog.records)
    print(f"daemon peak RSS growth with the bomb: {peak / MiB:.1f} MiB")
    assert peak < 64 * MiB, f"peak RSS grew by {peak / MiB:.0f} MiB"


def test_live_frames_beyond_max_pixels_are_dropped_not_judged(tmp_path: Path) -> None:
    """Streams are decoded by the capture backend; a frame beyond max_pixels is still never judged."""
    from runtime.config.station import load_config
    from runtime.serving.daemon import Daemon

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 40))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG AVI")
    for level in (40, 215, 40):
        writer.write(np.full((40, 48, 3), level, np.uint8))
    writer.release()
    config, endpoint = station_config(
        tmp_path,
        make_bundle(tmp_path / "bundle"),
        [{"id": "big", "source": str(path), "max_pixels": 48 * 40 - 1}, {"id": "ok", "source": str(path)}],
        publisher={"wait_for_subscribers": 1},
    )
    sub = Subscriber(endpoint)
    d = Daemon(load_config(config))
    try:
        d.start()
        assert d.run() == 0
        sub.until(lambda s: len(s.verdicts()) == 3, 10, what="the normal camera's 3 frames")
        assert {m["camera"] for m in sub.verdicts()} == {"ok"}
        dropped = d.metrics.registry.get_sample_value(
            "defectscope_frames_dropped_total", {"camera": "big", "reason": "too_large"}
        )
        assert dropped == 3
    finally:
        d.shutdown()
        sub.close()
