"""The ``[[cameras]]`` tables of a station config: one parsed, validated :class:`CameraConfig` each."""

from __future__ import annotations

import os
import re
from pathlib import Path

from runtime.config.table import Table, config_path
from runtime.config.types import (
    GST_READERS,
    ID_RE,
    ON_FULL,
    ROTATIONS,
    SOURCE_KINDS,
    CameraConfig,
)


def guess_kind(source: str) -> str:
    """Source kind from its string: URL scheme, device index, GStreamer '!' or the filesystem."""
    s = source.strip()
    low = s.lower()
    if low.startswith(("rtsp://", "rtsps://")):
        return "rtsp"
    if low.startswith(("http://", "https://")):
        return "http"
    if s.isdigit() or re.match(r"^/dev/video\d+$", s):
        return "v4l2"
    if "!" in s:
        return "gstreamer"
    if os.path.isdir(s):
        return "directory"
    return "video"


def parse_camera(t: Table, base: Path) -> CameraConfig:
    cam_id = t.get("id", str)
    if not ID_RE.match(cam_id):
        raise t.error("id", f"expected letters, digits, '_' or '-' (no dots, at most 64), got {cam_id!r}")
    source = t.get("source", (str, int))
    source = str(source)
    kind = t.choice("kind", SOURCE_KINDS, CameraConfig.kind)
    if (
        kind in ("auto", "directory", "video")
        and not re.match(r"^[a-z]+://", source)
        and "!" not in source
        and not source.isdigit()
    ):
        source = str(config_path(base, source))
    if kind == "auto":
        kind = guess_kind(source)
    if kind == "directory" and not os.path.isdir(source):
        raise t.error("source", f"directory {source!r} does not exist")
    if kind == "video" and not os.path.isfile(source):
        raise t.error("source", f"video file {source!r} does not exist (or set kind for a URL / device)")
    fps = t.number("fps", None, minimum=0.0, exclusive=True)
    roi = t.get("roi", list, None)
    if roi is not None:
        if (
            len(roi) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in roi)
            or roi[0] < 0
            or roi[1] < 0
            or roi[2] <= 0
            or roi[3] <= 0
        ):
            raise t.error("roi", f"expected [x, y, width, height] integers (x, y >= 0; width, height > 0), got {roi!r}")
        roi = tuple(roi)
    rotate = t.get("rotate", int, CameraConfig.rotate)
    if rotate not in ROTATIONS:
        raise t.error("rotate", f"expected one of {list(ROTATIONS)} (degrees clockwise), got {rotate!r}")
    default_full = "block" if kind in ("directory", "video") else "drop_oldest"
    initial = t.number("reconnect_initial_s", CameraConfig.reconnect_initial_s, minimum=0.0, exclusive=True)
    maximum = t.number("reconnect_max_s", CameraConfig.reconnect_max_s, minimum=0.0, exclusive=True)
    if maximum < initial:
        raise t.error("reconnect_max_s", f"expected >= reconnect_initial_s ({initial:g}), got {maximum:g}")
    cam = CameraConfig(
        id=cam_id,
        source=source,
        kind=kind,
        fps=fps,
        loop=t.get("loop", bool, CameraConfig.loop),
        roi=roi,
        rotate=rotate,
        queue_size=t.integer("queue_size", CameraConfig.queue_size, minimum=1, maximum=10_000),
        on_full=t.choice("on_full", ON_FULL, default_full),
        reconnect_initial_s=initial,
        reconnect_max_s=maximum,
        read_timeout_s=t.number("read_timeout_s", CameraConfig.read_timeout_s, minimum=0.0, exclusive=True),
        preload_mb=t.number("preload_mb", CameraConfig.preload_mb, minimum=0.0, maximum=1_048_576.0),
        gst_reader=t.choice("gst_reader", GST_READERS, CameraConfig.gst_reader),
        max_pixels=t.integer("max_pixels", CameraConfig.max_pixels, minimum=1, maximum=1 << 31),
    )
    if cam.preload_mb and kind != "directory":
        raise t.error("preload_mb", f"only directory replays can be preloaded; this camera is a {kind} source")
    if cam.gst_reader != "auto" and kind != "gstreamer":
        raise t.error("gst_reader", f"only gstreamer pipelines pick a reader; this camera is a {kind} source")
    t.finish()
    return cam
