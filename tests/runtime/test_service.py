"""The HTTP service surface under hostile clients: half-open requests, resets, slow readers.

Real sockets against the real server (``runtime.serving.service.HealthServer``) on loopback.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from runtime.serving.service import HealthServer, PidFile, port_free

from ._helpers import free_port, http_get


@pytest.fixture
def server():
    servers: list[HealthServer] = []

    def start(timeout_s: float = 1.0, max_connections: int = 4) -> HealthServer:
        s = HealthServer(
            "127.0.0.1",
            0,
            lambda: b"# metrics\n",
            lambda: (True, {"ready": True}),
            lambda: (True, {"alive": True}),
            timeout_s=timeout_s,
            max_connections=max_connections,
        )
        s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _half_open(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the request
    return s


def _http_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("Thread-") and "process_request" in t.name)


def test_forty_half_open_requests_neither_pile_up_threads_nor_block_for_long(server) -> None:
    """Attack: 40 clients open a request and never finish it (slowloris); before the fix each
    held a thread forever and the station's metrics went dark."""
    srv = server(timeout_s=1.0, max_connections=4)
    before = threading.active_count()
    socks = [_half_open(srv.port) for _ in range(40)]
    try:
        time.sleep(0.3)
        assert threading.active_count() - before <= 4  # bounded: one thread per slot, the rest closed
        # Each held connection is cut after http_timeout_s; then a real scrape is answered.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                status, body = http_get(f"http://127.0.0.1:{srv.port}/readyz", timeout=2.0)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server never recovered from the half-open clients"
                time.sleep(0.1)
        assert status == 200 and json.loads(body) == {"ready": True}
        assert time.monotonic() - (deadline - 5.0) < 3.0  # within ~ the 1 s timeout, not indefinitely
        closed = 0
        for s in socks:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""  # the server hung up on the slow client
            except (ConnectionResetError, TimeoutError):
                closed += 1
        assert closed == 40
        time.sleep(0.2)
        assert threading.active_count() <= before + 1
    finally:
        for s in socks:
            s.close()


def test_client_resets_do_not_print_tracebacks(server, capfd) -> None:
    """Clients that reset mid-request or mid-answer (RST, SO_LINGER 0) are logged at debug only."""
    srv = server(timeout_s=1.0)
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" if i % 2 else b"GET /met")
        s.close()  # RST: the server's read or write fails with ECONNRESET / EPIPE
    time.sleep(0.5)
    assert http_get(f"http://127.0.0.1:{srv.port}/healthz")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err[-2000:]


def test_port_check_names_a_busy_port() -> None:
    port = free_port()
    assert port_free("127.0.0.1", port) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert f"cannot bind 127.0.0.1:{port}" in port_free("127.0.0.1", port)


def test_pid_file_is_written_atomically_and_removed_only_if_ours(tmp_path: Path) -> None:
    import os

    pid = PidFile(tmp_path / "run" / "d.pid")
    pid.write()
    assert (tmp_path / "run" / "d.pid").read_text() == f"{os.getpid()}\n"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["d.pid"]  # no temp file left
    pid.remove()
    assert not (tmp_path / "run" / "d.pid").exists()
    other = PidFile(tmp_path / "o.pid")
    other.write()
    (tmp_path / "o.pid").write_text("1\n")  # another daemon took the file over
    other.remove()
    assert (tmp_path / "o.pid").read_text() == "1\n"


def test_a_client_trickling_its_request_is_cut_off_at_the_request_deadline(server) -> None:
    """Attack: one byte every 0.3 s keeps each read under the per-operation timeout forever."""
    srv = server(timeout_s=1.0, max_connections=1)
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    start = time.monotonic()
    try:
        for ch in b"GET /metrics HTTP/1.1\r\nHost: " + b"x" * 100:
            s.sendall(bytes([ch]))
            time.sleep(0.3)
            if time.monotonic() - start > 6:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    cut = time.monotonic() - start
    assert cut < 3.0, f"trickling client held its slot {cut:.1f}s"
    s.close()
    assert http_get(f"http://127.0.0.1:{srv.port}/healthz")[0] == 200  # the only slot is free again
