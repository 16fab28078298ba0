"""systemd notify protocol (sd_notify) without libsystemd: datagrams to $NOTIFY_SOCKET.

``READY=1`` once serving, ``WATCHDOG=1`` only while the pipeline makes progress,
``STATUS=...`` for ``systemctl status``, ``RELOADING=1`` / ``STOPPING=1``.
Without systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger("defectscope.notify")


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr:
            # '@name' is a Linux abstract-namespace socket: a leading NUL byte.
            self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.watchdog_usec = 0
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half the systemd watchdog timeout (as sd_watchdog_enabled advises), None without one."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
                return True
            except OSError as exc:
                log.debug("sd_notify to %r failed: %s", self.address, exc)
                return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload units match the reload to this message.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """Sends WATCHDOG=1 every interval while ``progress()`` is true, and STATUS= from ``status()``.

    Without a systemd watchdog only STATUS is refreshed (every ``status_every_s``).
    """

    def __init__(
        self,
        notifier: Notifier,
        progress: Callable[[], bool],
        status: Callable[[], str],
        interval_s: float | None = None,
        status_every_s: float = 5.0,
    ) -> None:
        self.notifier = notifier
        self.progress = progress
        self.status = status
        self.interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s
        self.status_every_s = status_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self.stalled = False

    def start(self) -> None:
        if self.notifier.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _run(self) -> None:
        tick = min(self.interval_s or self.status_every_s, self.status_every_s)
        last_status = 0.0
        last_text = ""
        while not self._stop.wait(tick):
            if self.interval_s:
                ok = self.progress()
                if ok:
                    self.notifier.watchdog()
                if ok == self.stalled:  # state change
                    self.stalled = not ok
                    if self.stalled:
                        log.error("pipeline stalled: withholding WATCHDOG=1 (systemd will restart the service)")
            now = time.monotonic()
            if now - last_status >= self.status_every_s:
                text = self.status()
                if text != last_text:
                    self.notifier.status(text)
                    last_text = text
                last_status = now
