"""A real RTSP camera for the tests: GstRtspServer serving a live JPEG-over-RTP stream.

Run by Debian's ``/usr/bin/python3`` (PyGObject + GstRtspServer are system packages, not in
the venv): ``python3 rtsp_server.py PORT [LEVEL]``; prints "ready" once listening and serves
``rtsp://127.0.0.1:PORT/cam`` (64x48 frames of gray LEVEL, 20 frames/s) until SIGTERM.
"""

from __future__ import annotations

import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

ELEMENTS = ("videotestsrc", "videoconvert", "jpegenc", "rtpjpegpay")


def main() -> int:
    Gst.init(None)
    missing = [e for e in ELEMENTS if Gst.ElementFactory.find(e) is None]
    if missing:
        print(f"missing GStreamer elements: {' '.join(missing)}", flush=True)
        return 3
    port = sys.argv[1]
    level = int(sys.argv[2]) if len(sys.argv) > 2 else 215
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    # rtpjpegpay takes 4:2:0 JPEG only, hence the I420 conversion before jpegenc.
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=solid-color foreground-color={0xFF000000 | level * 0x010101} "
        "! video/x-raw,width=64,height=48,framerate=20/1 ! videoconvert ! video/x-raw,format=I420 "
        "! jpegenc ! rtpjpegpay name=pay0 pt=26 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{port}", flush=True)
        return 2
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print("ready", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
