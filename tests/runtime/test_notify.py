"""sd_notify on a real unix datagram socket; the watchdog pings only while the pipeline progresses."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from runtime.serving.notify import Notifier, Watchdog


@pytest.fixture
def notify_socket(tmp_path: Path):
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    yield str(path), sock
    sock.close()


def _drain(sock: socket.socket, seconds: float) -> list[str]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            pass
    return out


def test_notifier_sends_protocol_lines(notify_socket) -> None:
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval_s == 1.5
    assert n.ready("serving")
    assert n.watchdog()
    assert n.reloading()
    assert n.stopping()
    lines = _drain(sock, 0.2)
    assert lines[:2] == ["READY=1", "STATUS=serving"]
    assert "WATCHDOG=1" in lines and "RELOADING=1" in lines and "STOPPING=1" in lines
    assert any(line.startswith("MONOTONIC_USEC=") for line in lines)
    n.close()


def test_without_systemd_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None
    assert n.ready() is False and n.watchdog() is False
    # A watchdog for another process is not ours to feed.
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}).watchdog_interval_s is None


def test_abstract_socket_address() -> None:
    assert (
        Notifier({"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify"}).address == "\0/org/freedesktop/systemd1/notify"
    )


def test_watchdog_pings_only_while_progressing(notify_socket) -> None:
    path, sock = notify_socket
    progressing = threading.Event()
    progressing.set()
    n = Notifier({"NOTIFY_SOCKET": path})
    wd = Watchdog(n, progressing.is_set, lambda: "busy", interval_s=0.05, status_every_s=0.05)
    wd.start()
    try:
        moving = _drain(sock, 0.4)
        assert moving.count("WATCHDOG=1") >= 3
        assert "STATUS=busy" in moving
        progressing.clear()  # a stalled pipeline: systemd must be allowed to kill us
        time.sleep(0.1)
        _drain(sock, 0.1)
        stalled = _drain(sock, 0.4)
        assert "WATCHDOG=1" not in stalled
        assert wd.stalled
        progressing.set()
        assert "WATCHDOG=1" in _drain(sock, 0.4)
    finally:
        wd.stop()
