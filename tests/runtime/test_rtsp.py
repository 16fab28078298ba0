"""A real RTSP camera (GstRtspServer) goes away and comes back: reconnections are counted as
successes apart from attempts, and with the default backoff the camera is judged again within
seconds of its return (the old 30 s cap left a recovered camera dark for ~13 s)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from runtime.config.station import CameraConfig, load_config
from runtime.serving.daemon import Daemon

from ._helpers import Subscriber, free_port, http_get, make_bundle, metric, scrape, station_config

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).with_name("rtsp_server.py")


def _rtsp_available() -> str | None:
    if not shutil.which(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-c",
            "import gi; gi.require_version('GstRtspServer', '1.0'); "
            "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
            "import sys; sys.exit(any(Gst.ElementFactory.find(e) is None for e in "
            "('videotestsrc', 'videoconvert', 'jpegenc', 'rtpjpegpay')))",
        ],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode:
        return (
            "GstRtspServer or GStreamer elements missing for the system python3 (make system-deps: "
            "gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gst-1.0 gstreamer1.0-plugins-good)"
        )
    return None


_SKIP = _rtsp_available()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


class RTSPCamera:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER), str(self.port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"RTSP server did not start: {line!r}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def test_rtsp_outage_and_recovery_with_the_default_backoff(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    cam = RTSPCamera(free_port())
    cam.start()
    # Backoff keys at their defaults (the subject of the test); a 1 s read timeout only makes the
    # outage detected sooner.
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "rtsp", "source": cam.url, "read_timeout_s": 1.0}],
        metrics={"ready_max_frame_age_s": 1.0},
    )
    cfg = load_config(config)
    assert cfg.cameras[0].kind == "rtsp"
    assert cfg.cameras[0].reconnect_max_s == CameraConfig.reconnect_max_s <= 2.0
    sub = Subscriber(endpoint)
    d = Daemon(cfg)
    try:
        d.start()
        t = threading.Thread(target=d.run, daemon=True)
        t.start()
        base = f"http://127.0.0.1:{d.http.port}"
        sub.until(lambda s: len(s.verdicts("rtsp")) >= 3, 30, what="RTSP frames judged")
        assert {m["verdict"] for m in sub.verdicts("rtsp")} == {"defect"}  # bright frames
        assert all(m["source"] is None for m in sub.verdicts("rtsp"))  # streams have no file name

        cam.stop()
        deadline = time.monotonic() + 15
        while json.loads(http_get(base + "/readyz")[1])["cameras"]["rtsp"]["up"]:
            assert time.monotonic() < deadline, "outage not noticed"
            sub.pump(0.1)
        status, body = http_get(base + "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True  # the model serves; the camera is down
        time.sleep(6.0)  # a long outage: several failed reopen attempts, the backoff at its cap
        samples = scrape(base + "/metrics")
        assert metric(samples, "defectscope_camera_up", camera="rtsp") == 0
        assert metric(samples, "defectscope_camera_reconnects_total", camera="rtsp") == 0  # none succeeded yet
        attempts = metric(samples, "defectscope_camera_reconnect_attempts_total", camera="rtsp")
        assert attempts >= 3

        sub.pump(0.1)
        before = len(sub.verdicts("rtsp"))
        cam.start()
        back = time.monotonic()
        sub.until(lambda s: len(s.verdicts("rtsp")) > before, 20, what="the camera judged again")
        dark = time.monotonic() - back
        assert dark < 5.0, f"camera dark {dark:.1f}s after it came back"
        samples = scrape(base + "/metrics")
        assert metric(samples, "defectscope_camera_reconnects_total", camera="rtsp") == 1
        assert metric(samples, "defectscope_camera_reconnect_attempts_total", camera="rtsp") > attempts - 1
        assert metric(samples, "defectscope_camera_up", camera="rtsp") == 1
        seqs = [m["seq"] for m in sub.verdicts("rtsp")]
        assert seqs == sorted(set(seqs))
        d.request_stop()
        t.join(20)
        assert not t.is_alive()
    finally:
        d.shutdown()
        cam.stop()
        sub.close()
