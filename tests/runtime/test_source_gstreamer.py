"""GStreamer cameras through PyGObject (issue 30): real pipelines (videotestsrc, the real RTSP server of
test_rtsp.py through rtspsrc), reconnects, a dead pipeline, and the error when no reader exists.

The project venv has no ``gi``; Debian's python3-gi (same CPython minor) is put on sys.path alone
(a directory holding only a ``gi`` link), which is what ``--system-site-packages`` gives a station.
"""

from __future__ import annotations

import functools
import glob
import importlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.config.station import CameraConfig, ConfigError, load_config
from runtime.sources.readers import SourceError, open_reader

from ._helpers import ROOT, Subscriber, free_port, make_bundle, metric, scrape, station_config
from .test_rtsp import RTSPCamera, _rtsp_available

DEBIAN_GI = "/usr/lib/python3/dist-packages/gi"
ELEMENTS = ("videotestsrc", "videoconvert", "appsink", "rtspsrc", "rtpjpegdepay", "jpegdec")


def _gi_on_path() -> str | None:
    """Put Debian's gi on sys.path when this Python has none; None when done, else why not."""
    if importlib.util.find_spec("gi") is None:
        tag = sys.implementation.cache_tag.replace("cpython-", "")
        if not glob.glob(f"{DEBIAN_GI}/_gi.cpython-{tag}*.so"):
            return f"no PyGObject for this Python (apt install python3-gi matching python{tag[0]}.{tag[1:]})"
        shim = tempfile.mkdtemp(prefix="gi-shim-")
        os.symlink(DEBIAN_GI, os.path.join(shim, "gi"))
        sys.path.append(shim)
    return None


def _pygobject() -> str | None:
    """None when gi + GStreamer with ELEMENTS import here (adding Debian's gi if needed), else why not."""
    if why := _gi_on_path():
        return why
    from runtime.sources.gstreamer import pygobject_problem

    pygobject_problem.cache_clear()
    if why := pygobject_problem():
        return f"PyGObject/GStreamer not usable: {why}"
    from gi.repository import Gst

    missing = [e for e in ELEMENTS if Gst.ElementFactory.find(e) is None]
    return f"GStreamer elements missing: {missing} (gstreamer1.0-plugins-base/-good)" if missing else None


# gi (GLib) loaded beside torch and OpenVINO in one process aborts the interpreter when OpenVINO
# compiles a model, and the suite's process has both: gi is only ever imported in child processes.
_CHILD = "DEFECTSCOPE_TEST_GI_CHILD"


def _probe() -> str | None:
    code = "from tests.runtime.test_source_gstreamer import _pygobject; print(_pygobject() or '')"
    env = {**os.environ, _CHILD: "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return f"PyGObject probe failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return r.stdout.strip() or None


def _run_in_child(module: str, name: str, args: tuple, kwargs: dict) -> None:
    if why := _gi_on_path():
        raise RuntimeError(why)
    getattr(importlib.import_module(module), name).__wrapped__(*args, **kwargs)


def isolated(fn: Callable[..., None]) -> Callable[..., None]:
    """Run the test body in a fresh interpreter (spawn), where gi may load (see _CHILD)."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        os.environ[_CHILD] = "1"  # inherited by the spawned child: no probe there
        try:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                pool.apply(_run_in_child, (fn.__module__, fn.__name__, args, kwargs))
        finally:
            os.environ.pop(_CHILD, None)

    return wrapper


_SKIP = None if os.environ.get(_CHILD) else _probe()
needs_gi = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _solid(width: int, height: int, fmt: str, level: int = 0x20, extra: str = "") -> str:
    color = 0xFF000000 | (level + 0x20) << 16 | (level + 0x10) << 8 | level  # ARGB: B = level
    return (
        f"videotestsrc pattern=solid-color foreground-color={color} {extra}! "
        f"video/x-raw,width={width},height={height},framerate=30/1 ! videoconvert ! "
        f"video/x-raw,format={fmt} ! appsink"
    )


@needs_gi
@isolated
@pytest.mark.parametrize(("fmt", "width"), [("BGR", 64), ("BGR", 50), ("GRAY8", 37), ("BGRx", 21)])
def test_videotestsrc_frames_arrive_with_the_pipeline_size_and_pixels(fmt: str, width: int) -> None:
    """Odd widths: GStreamer pads RGB rows to 4 bytes; the reader must drop the padding, not skew rows."""
    reader = open_reader(CameraConfig(id="c", source=_solid(width, 30, fmt), kind="gstreamer"))
    try:
        assert type(reader).__name__ == "GstReader"
        for _ in range(3):
            image, name = reader.read()
            assert name is None and image.dtype == np.uint8 and image.flags.c_contiguous
            if fmt == "GRAY8":
                assert image.shape == (30, width)
                assert len(np.unique(image)) == 1
            else:
                assert image.shape == (30, width, 3)
                np.testing.assert_array_equal(np.unique(image.reshape(-1, 3), axis=0), [[0x20, 0x30, 0x40]])
    finally:
        reader.close()


@needs_gi
@isolated
def test_unbounded_appsink_is_bounded_and_caps_default_to_bgr() -> None:
    """A pipeline with a bare appsink gets max-buffers (drop oldest) and BGR/GRAY caps."""
    src = "videotestsrc ! video/x-raw,width=16,height=8 ! videoconvert ! appsink"
    reader = open_reader(CameraConfig(id="c", source=src, kind="gstreamer"))
    try:
        from runtime.sources.gstreamer import APPSINK_MAX_BUFFERS

        assert reader.sink.get_property("max-buffers") == APPSINK_MAX_BUFFERS
        assert reader.sink.get_property("drop") is True
        image, _ = reader.read()
        assert image.shape == (8, 16, 3)
    finally:
        reader.close()


@needs_gi
@isolated
def test_a_frame_over_the_size_limit_is_refused_not_copied() -> None:
    """A camera announcing huge frames cannot make the station copy them (limit lowered to 4 KB here)."""
    from runtime.sources import gstreamer as source_gstreamer

    source_gstreamer.MAX_FRAME_BYTES = 4096  # this child process only
    reader = open_reader(CameraConfig(id="c", source=_solid(64, 48, "BGR"), kind="gstreamer"))
    try:
        with pytest.raises(SourceError, match=r"frame 64x48 \(9216 bytes\) refused \(limit 4096\)"):
            reader.read()
    finally:
        reader.close()


@needs_gi
@isolated
@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("videotestsrc ! nosuchelement ! appsink", r'invalid GStreamer pipeline: no element "nosuchelement"'),
        ("videotestsrc ! fakesink", r"has no appsink \(end it with '! appsink'\)"),
        (
            "videotestsrc ! video/x-raw,format=I420 ! appsink caps=video/x-raw,format=I420",
            r"appsink delivers I420; expected one of .*videoconvert",
        ),
    ],
)
def test_dead_pipelines_fail_with_a_clear_error(source: str, error: str) -> None:
    with pytest.raises(SourceError, match=error):
        reader = open_reader(CameraConfig(id="c", source=source, kind="gstreamer"))
        try:
            reader.read()
        finally:
            reader.close()


@needs_gi
@isolated
def test_unreachable_rtsp_camera_names_the_gstreamer_error_without_waiting_for_the_timeout() -> None:
    port = free_port()  # nothing listens
    src = (
        f"rtspsrc location=rtsp://inspect:s3cret@127.0.0.1:{port}/cam ! rtpjpegdepay ! jpegdec ! videoconvert ! appsink"
    )
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"GStreamer error from rtspsrc\d*: Could not open resource") as exc:
        reader = open_reader(CameraConfig(id="c", source=src, kind="gstreamer", read_timeout_s=30.0))
        try:
            reader.read()
        finally:
            reader.close()
    assert time.monotonic() - t0 < 20.0  # the bus error, not read_timeout_s
    assert "s3cret" not in str(exc.value) and "inspect:***@" in str(exc.value)


@needs_gi
@isolated
def test_serve_check_parses_gstreamer_pipelines(tmp_path: Path) -> None:
    from runtime.serving.serve_cli import station_checks

    bundle = make_bundle(tmp_path / "bundle")
    config, _ = station_config(
        tmp_path,
        bundle,
        [
            {"id": "good", "source": _solid(16, 8, "BGR")},
            {"id": "typo", "source": "videotestsrc ! videoconvrt ! appsink"},
        ],
    )
    checks = station_checks(load_config(config))
    assert checks["cameras[0].source"] is None
    assert 'no element "videoconvrt"' in checks["cameras[1].source"]


_RTSP_SKIP = _SKIP or _rtsp_available()


@pytest.mark.skipif(_RTSP_SKIP is not None, reason=_RTSP_SKIP or "")
@isolated
def test_rtsp_through_a_gstreamer_pipeline_survives_an_outage(tmp_path: Path) -> None:
    """The real RTSP server of test_rtsp.py read by rtspsrc (the software twin of the Jetson
    nvv4l2decoder pipeline): judged, lost when the server stops, reconnected when it returns."""
    from runtime.serving.daemon import Daemon

    bundle = make_bundle(tmp_path / "bundle")
    cam = RTSPCamera(free_port())
    cam.start()
    pipeline = (
        f"rtspsrc location={cam.url} latency=0 protocols=tcp ! rtpjpegdepay ! jpegdec ! "
        "videoconvert ! video/x-raw,format=BGR ! appsink max-buffers=1 drop=true"
    )
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "gst", "source": pipeline, "read_timeout_s": 1.0}],
        metrics={"ready_max_frame_age_s": 1.0},
    )
    cfg = load_config(config)
    assert cfg.cameras[0].kind == "gstreamer"
    sub = Subscriber(endpoint)
    d = Daemon(cfg)
    try:
        d.start()
        t = threading.Thread(target=d.run, daemon=True)
        t.start()
        base = f"http://127.0.0.1:{d.http.port}"
        sub.until(lambda s: len(s.verdicts("gst")) >= 3, 30, what="RTSP frames judged through GStreamer")
        assert {m["verdict"] for m in sub.verdicts("gst")} == {"defect"}  # gray 215 frames

        cam.stop()
        deadline = time.monotonic() + 20
        while metric(scrape(base + "/metrics"), "defectscope_camera_up", camera="gst") != 0:
            assert time.monotonic() < deadline, "outage not noticed"
            sub.pump(0.1)
        deadline = time.monotonic() + 30
        while metric(scrape(base + "/metrics"), "defectscope_camera_reconnect_attempts_total", camera="gst") < 2:
            assert time.monotonic() < deadline, "no reopen attempts during the outage"
            sub.pump(0.1)
        assert metric(scrape(base + "/metrics"), "defectscope_camera_reconnects_total", camera="gst") == 0

        sub.pump(0.1)
        before = len(sub.verdicts("gst"))
        cam.start()
        sub.until(lambda s: len(s.verdicts("gst")) > before, 30, what="the camera judged again")
        samples = scrape(base + "/metrics")
        assert metric(samples, "defectscope_camera_reconnects_total", camera="gst") == 1
        assert metric(samples, "defectscope_camera_up", camera="gst") == 1
        seqs = [m["seq"] for m in sub.verdicts("gst")]
        assert seqs == sorted(set(seqs))
        d.request_stop()
        t.join(20)
        assert not t.is_alive()
    finally:
        d.shutdown()
        cam.stop()
        sub.close()


# ---- no reader at all: a real subprocess where gi cannot be imported and cv2 lacks GStreamer ------
NO_GI = "import sys; sys.modules['gi'] = None; "  # `import gi` raises ImportError, as on a bare venv


def _no_reader_here() -> str | None:
    from runtime.sources.gstreamer import opencv_has_gstreamer

    return "this OpenCV is built with GStreamer (the fallback reader exists)" if opencv_has_gstreamer() else None


@pytest.mark.skipif(_no_reader_here() is not None, reason=_no_reader_here() or "")
def test_serve_check_names_what_is_missing_and_the_two_remedies(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    config, _ = station_config(tmp_path, bundle, [{"id": "csi", "source": _solid(16, 8, "BGR")}])
    code = NO_GI + "from defectscope.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", code, "serve", "--check", "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr
    assert "key 'cameras[0].source'" in err
    assert "PyGObject with GStreamer 1.0 is not usable" in err
    assert "built without GStreamer" in err
    assert "--system-site-packages" in err and "JetPack's python3-opencv" in err  # the two remedies
    assert "Traceback" not in err


@pytest.mark.skipif(_no_reader_here() is not None, reason=_no_reader_here() or "")
def test_startup_logs_the_missing_reader_and_keeps_the_station_up(tmp_path: Path) -> None:
    from ._helpers import spawn_daemon, stop

    bundle = make_bundle(tmp_path / "bundle")
    metrics_port = free_port()
    config, _ = station_config(
        tmp_path, bundle, [{"id": "csi", "source": _solid(16, 8, "BGR")}], metrics_port=metrics_port
    )
    proc = spawn_daemon(config, preamble=NO_GI)
    try:
        deadline = time.monotonic() + 60
        while True:  # the first open failed (logged) once a second attempt is counted
            assert proc.poll() is None, "the daemon exited"
            try:
                samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
                if metric(samples, "defectscope_camera_reconnect_attempts_total", camera="csi") >= 1:
                    break
            except (OSError, AssertionError):
                pass
            assert time.monotonic() < deadline, "no failed open of the camera"
            time.sleep(0.2)
        assert metric(samples, "defectscope_camera_up", camera="csi") == 0
    finally:
        code, err = stop(proc)
    assert code == 0, err[-3000:]
    assert "camera csi: " in err and "a gstreamer source needs PyGObject or an OpenCV built with GStreamer" in err
    assert "remedies: (1) PyGObject + GStreamer" in err


def test_gst_reader_key_is_validated(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    config, _ = station_config(
        tmp_path, bundle, [{"id": "c", "source": "videotestsrc ! appsink", "gst_reader": "opencv"}]
    )
    assert load_config(config).cameras[0].gst_reader == "opencv"
    config, _ = station_config(tmp_path, bundle, [{"id": "c", "source": str(tmp_path), "gst_reader": "pygobject"}])
    with pytest.raises(ConfigError, match=r"key 'cameras\[0\].gst_reader': only gstreamer pipelines pick a reader"):
        load_config(config)
