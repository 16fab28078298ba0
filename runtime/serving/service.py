"""The daemon's service surface: HTTP (/metrics /healthz /readyz), the pid file, reload records.

The HTTP server is exposed to whatever can reach ``[metrics] host``: each connection gets
``http_timeout_s`` to send its whole request (and per write of the answer), and at most
``http_max_connections`` are served at once (one thread each); a connection beyond that is
closed unanswered, so half-open clients cannot pile up threads. Client resets and timeouts are logged at debug level, never printed
as tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from runtime.fsio import atomic_write_text

log = logging.getLogger("defectscope.daemon")

Probe = Callable[[], tuple[bool, dict[str, Any]]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections closed because every slot was busy
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # resets, broken pipes, slow clients
            log.debug("http: %s: %s", client_address, exc)
        else:
            log.exception("http: error serving %s", client_address)


class _V6Server(_Server):
    address_family = socket.AF_INET6


class HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on one port, in a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        render: Callable[[], bytes],
        ready: Probe,
        alive: Probe,
        timeout_s: float = 5.0,
        max_connections: int = 8,
    ) -> None:
        self.render, self.ready, self.alive = render, ready, alive
        cls = _V6Server if ":" in host else _Server
        try:
            self.httpd = cls((host, port), _handler(self, timeout_s), max_connections)
        except OSError as exc:
            raise OSError(f"key 'metrics.port': cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.port = self.httpd.server_address[1]
        self.host = host
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


def _handler(outer: HealthServer, timeout_s: float) -> type:
    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # seconds per socket operation (StreamRequestHandler.setup applies it)

        def setup(self) -> None:
            super().setup()
            # The whole request must arrive within timeout_s, not each byte: a client trickling one
            # byte at a time would otherwise hold its slot for as long as it likes.
            deadline = time.monotonic() + timeout_s
            conn, raw = self.connection, self.rfile.raw  # type: ignore[attr-defined]
            read = raw.readinto

            def readinto(buf: Any) -> int:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"request not complete within {timeout_s:g}s")
                conn.settimeout(min(timeout_s, left))
                return read(buf)

            raw.readinto = readinto

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, outer.render(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, body = (outer.alive if path == "/healthz" else outer.ready)()
                self._json(200 if ok else 503, body)
            else:
                self._json(404, {"error": f"no such path {path[:100]!r}", "paths": ["/metrics", "/healthz", "/readyz"]})

        def _json(self, code: int, body: dict[str, Any]) -> None:
            self._send(code, (json.dumps(body, indent=1) + "\n").encode(), "application/json")

        def _send(self, code: int, data: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("http %s", fmt % args)

    return Handler


def port_free(host: str, port: int) -> str | None:
    """``serve --check``: None when ``host:port`` can be bound now, else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return f"cannot bind {host}:{port}: {exc.strerror or exc}"
    return None


# ---- reload record ---------------------------------------------------------------------------------
def reload_record(result: str | None = None, error: str | None = None, version: str | None = None) -> dict[str, Any]:
    """``last_reload`` in /readyz and the status heartbeat: result "ok" | "failed" | None (no reload yet)."""
    return {
        "result": result,
        "error": error,
        "version": version,
        "at": round(time.time(), 3) if result is not None else None,
    }


# ---- pid file --------------------------------------------------------------------------------------
class PidFile:
    """``[daemon] pid_file`` for ``defectscope reload --config`` outside systemd; best effort."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._written = False

    def write(self) -> None:
        path = self.path
        if path is None:
            return
        try:
            atomic_write_text(path, f"{os.getpid()}\n")
            self._written = True
        except OSError as exc:  # serving matters more than `defectscope reload --config` working
            log.error(
                "key 'daemon.pid_file': cannot write %s (%s); `defectscope reload --config` will not find "
                "this process (systemctl reload / kill -HUP still work)",
                path,
                exc.strerror or exc,
            )

    def remove(self) -> None:
        path = self.path
        if path is None or not self._written:
            return
        try:
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()
        except OSError:
            pass
