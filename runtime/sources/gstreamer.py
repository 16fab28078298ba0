"""GStreamer cameras: the pipeline runs through PyGObject (gi, Gst, appsink), whatever OpenCV's build.

The pip wheel ``opencv-python-headless`` is built without GStreamer, so ``cv2.CAP_GSTREAMER`` cannot
open a Jetson CSI camera (``nvarguscamerasrc``) or a hardware-decoded RTSP stream (``nvv4l2decoder``).
A ``gstreamer`` camera therefore runs its pipeline with PyGObject when ``gi`` and GStreamer 1.0 are
importable, falls back to OpenCV's CAP_GSTREAMER only when that build has it, and otherwise fails
with what is missing and the two remedies (camera key ``gst_reader`` forces one reader).

The pipeline is a gst-launch description ending in an ``appsink``; frames reach the station as
uint8 BGR or gray. The appsink's queue is bounded (``max-buffers`` 0 = unlimited is replaced by
:data:`APPSINK_MAX_BUFFERS`, dropping the oldest) and a frame larger than :data:`MAX_FRAME_BYTES` is
refused: a camera cannot grow the station's memory.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

import cv2
import numpy as np

from runtime.config.station import CameraConfig
from runtime.sources.readers import CaptureReader, Reader, SourceError, _safe

APPSINK_MAX_BUFFERS = 2  # frames the appsink holds when the pipeline leaves it unbounded
MAX_FRAME_BYTES = 256 * 2**20  # one decoded frame; 8K BGR is ~100 MB
# Raw formats the reader accepts from the appsink -> channels (BGRx/BGRA lose their 4th byte).
FORMATS = {"BGR": 3, "GRAY8": 1, "BGRx": 4, "BGRA": 4}
DEFAULT_CAPS = "video/x-raw,format={ BGR, GRAY8, BGRx, BGRA }"
_CREDENTIALS = re.compile(r"(://[^:/@\s]*):[^@\s]*@")  # a URL password inside a GStreamer message
POLL_S = 0.05  # bus checks while waiting for a frame: errors surface within this, not read_timeout_s
REMEDIES = (
    "remedies: (1) PyGObject + GStreamer: apt install python3-gi gir1.2-gstreamer-1.0 "
    "gir1.2-gst-plugins-base-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good and create the "
    "station's venv with --system-site-packages (or pip install 'PyGObject<3.50' with "
    "libgirepository1.0-dev libcairo2-dev); (2) an OpenCV built with "
    "GStreamer instead of opencv-python-headless (on a Jetson: JetPack's python3-opencv, README "
    "'Jetson stations')"
)


@functools.cache
def pygobject_problem() -> str | None:
    """None when ``gi`` with Gst + GstApp 1.0 imports and initialises here, else why not."""
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstApp", "1.0")
        from gi.repository import Gst, GstApp  # noqa: F401

        Gst.init(None)
    except (ImportError, ValueError) as exc:  # ValueError: typelib missing ("Namespace Gst not available")
        return f"{type(exc).__name__}: {exc}"
    return None


def opencv_build_flag(name: str) -> str:
    """A ``Video I/O`` entry of ``cv2.getBuildInformation()`` ("YES (1.22.0)", "NO"), or "unknown"."""
    for line in cv2.getBuildInformation().splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key.strip().lower() == name.lower():
            return value.strip()
    return "unknown"


def opencv_has_gstreamer() -> bool:
    return opencv_build_flag("GStreamer").upper().startswith("YES")


def gstreamer_reader(cfg: CameraConfig) -> tuple[str | None, str | None]:
    """(reader, None) with reader "pygobject" or "opencv", or (None, why not + remedies)."""
    gi_why = pygobject_problem() if cfg.gst_reader in ("auto", "pygobject") else None
    if cfg.gst_reader in ("auto", "pygobject") and gi_why is None:
        return "pygobject", None
    if cfg.gst_reader in ("auto", "opencv") and opencv_has_gstreamer():
        return "opencv", None
    parts = []
    if cfg.gst_reader != "opencv":
        parts.append(f"PyGObject with GStreamer 1.0 is not usable ({gi_why})")
    if cfg.gst_reader != "pygobject":
        parts.append(f"OpenCV {cv2.__version__} is built without GStreamer (getBuildInformation: GStreamer NO)")
    forced = f" (gst_reader = {cfg.gst_reader!r})" if cfg.gst_reader != "auto" else ""
    return None, f"a gstreamer source needs PyGObject or an OpenCV built with GStreamer{forced}: " + (
        "; ".join(parts) + f"; {REMEDIES}"
    )


def open_gstreamer(cfg: CameraConfig) -> Reader:
    reader, why = gstreamer_reader(cfg)
    if reader == "pygobject":
        return GstReader(cfg)
    if reader == "opencv":
        return CaptureReader(cfg)
    raise SourceError(f"{_safe(cfg.source)}: {why}")


def _gst() -> Any:
    from gi.repository import Gst

    return Gst


class GstReader:
    """A gst-launch pipeline ending in an appsink, pulled frame by frame (no GLib main loop needed)."""

    live = True

    def __init__(self, cfg: CameraConfig) -> None:
        from gi.repository import GLib

        Gst = _gst()
        self.cfg, self.Gst = cfg, Gst
        self.where = _safe(cfg.source)
        self.timeout_s = cfg.read_timeout_s
        try:
            pipeline = Gst.parse_launch(cfg.source)
        except GLib.Error as exc:
            raise SourceError(f"{self.where}: invalid GStreamer pipeline: {exc.message}") from None
        sink = next((e for e in _elements(pipeline) if _factory(e) == "appsink"), None)
        if sink is None:
            raise SourceError(f"{self.where}: the GStreamer pipeline has no appsink (end it with '! appsink')")
        if sink.get_property("max-buffers") == 0:  # unbounded: a stalled station would queue every frame
            sink.set_property("max-buffers", APPSINK_MAX_BUFFERS)
            sink.set_property("drop", True)
        if sink.get_property("caps") is None:
            sink.set_property("caps", Gst.Caps.from_string(DEFAULT_CAPS))
        sink.set_property("sync", False)  # hand frames over as they arrive; the camera thread paces
        sink.set_property("emit-signals", False)
        self.pipeline, self.sink, self.bus = pipeline, sink, pipeline.get_bus()
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            why = self._bus_problem() or "the pipeline refused to start"
            self.close()
            raise SourceError(f"{self.where}: {why}")

    def _bus_problem(self) -> str | None:
        """The first error (or end of stream) posted on the pipeline's bus, as one line."""
        Gst = self.Gst
        msg = self.bus.pop_filtered(Gst.MessageType.ERROR | Gst.MessageType.EOS)
        if msg is None:
            return None
        if msg.type == Gst.MessageType.EOS:
            return "stream ended (GStreamer EOS)"
        err, debug = msg.parse_error()
        src = msg.src.get_name() if msg.src is not None else "pipeline"
        detail = (debug or "").strip().splitlines()[-1:] if debug else []
        text = f"GStreamer error from {src}: {err.message}" + (f" ({detail[0][:200]})" if detail else "")
        return _CREDENTIALS.sub(r"\1:***@", text)

    def read(self) -> tuple[np.ndarray, str | None] | None:
        Gst = self.Gst
        deadline = time.monotonic() + self.timeout_s
        while True:
            sample = self.sink.try_pull_sample(int(POLL_S * Gst.SECOND))
            if sample is not None:
                return self._image(sample), None
            why = self._bus_problem()
            if why is None and self.sink.is_eos():
                why = "stream ended (GStreamer EOS)"
            if why is not None:
                raise SourceError(f"{self.where}: {why}")
            if time.monotonic() >= deadline:
                raise SourceError(f"{self.where}: no frame within read_timeout_s = {self.timeout_s:g}s")

    def _image(self, sample: Any) -> np.ndarray:
        caps = sample.get_caps().get_structure(0)
        fmt = caps.get_value("format")
        width, height = caps.get_value("width"), caps.get_value("height")
        channels = FORMATS.get(fmt)
        if channels is None:
            raise SourceError(
                f"{self.where}: appsink delivers {fmt}; expected one of {list(FORMATS)} "
                "(add '! videoconvert ! video/x-raw,format=BGR' before the appsink)"
            )
        buf = sample.get_buffer()
        size = buf.get_size()
        if size > MAX_FRAME_BYTES or not (0 < width and 0 < height):
            raise SourceError(f"{self.where}: frame {width}x{height} ({size} bytes) refused (limit {MAX_FRAME_BYTES})")
        ok, info = buf.map(self.Gst.MapFlags.READ)
        if not ok:
            raise SourceError(f"{self.where}: cannot map a GStreamer buffer")
        try:
            data = np.frombuffer(info.data, dtype=np.uint8, count=size)
            stride = size // height  # GStreamer pads rows (RGB: to 4 bytes)
            if stride < width * channels or stride * height != size:
                raise SourceError(f"{self.where}: {size}-byte buffer does not hold a {width}x{height} {fmt} frame")
            rows = data.reshape(height, stride)[:, : width * channels].reshape(height, width, channels)
            image = np.ascontiguousarray(rows[:, :, :3] if channels == 4 else rows)  # copy: the buffer is reused
        finally:
            buf.unmap(info)
        return image[:, :, 0] if channels == 1 else image

    def close(self) -> None:
        self.pipeline.set_state(self.Gst.State.NULL)


def _elements(pipeline: Any) -> list[Any]:
    """Every element of a (nested) bin; a one-element description is returned as the element."""
    Gst = _gst()
    if not isinstance(pipeline, Gst.Bin):
        return [pipeline]
    out: list[Any] = []
    it = pipeline.iterate_recurse()
    while True:
        res, elem = it.next()
        if res != Gst.IteratorResult.OK:
            return out
        out.append(elem)


def _factory(element: Any) -> str:
    factory = element.get_factory()
    return factory.get_name() if factory is not None else ""


def check_gstreamer(cfg: CameraConfig) -> str | None:
    """``serve --check``: None when a reader for this gstreamer camera exists here, else why not.

    The pipeline is not started (the camera may be off while the config is checked), but it must
    parse when PyGObject is the reader: a misspelt element is named now, not at 3 am.
    """
    reader, why = gstreamer_reader(cfg)
    if reader != "pygobject":
        return why
    from gi.repository import GLib

    try:
        pipeline = _gst().parse_launch(cfg.source)
    except GLib.Error as exc:
        return f"{_safe(cfg.source)}: invalid GStreamer pipeline: {exc.message}"
    if not any(_factory(e) == "appsink" for e in _elements(pipeline)):
        return f"{_safe(cfg.source)}: the GStreamer pipeline has no appsink (end it with '! appsink')"
    return None
