"""The alarm webhook: POST the alarm state as JSON to each URL on every change and every ``webhook_repeat_s``.

Body: ``{"type": "alarms", "event": "raised"|"cleared"|"acknowledged"|"state", "alarm": {...}|null,
"alarms": [open alarms], "active": bool, "unacknowledged": bool, "sent_at": unix s}``. Each body
carries the whole state, so a receiver that missed one (restart, timeout) is right again at the
next; a receiver hearing nothing for a few repeats knows the console is gone. With a secret the
header ``X-DefectScope-Signature: sha256=<hex HMAC-SHA256 of the body>`` signs it. One thread
sends; at most QUEUE events wait (more are dropped: the next state carries them).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("defectscope.console.webhook")
QUEUE = 64
TIMEOUT_S = 3.0
SIGNATURE = "X-DefectScope-Signature"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def read_secret(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes().strip()


class Webhook:
    def __init__(
        self, urls: tuple[str, ...], secret: bytes | None, repeat_s: float, on_failure: Callable[[], None] | None = None
    ) -> None:
        self.urls = urls
        self.on_failure = on_failure  # e.g. a Prometheus counter's inc (thread-safe)
        self.secret = secret
        self.repeat_s = repeat_s
        self.latest: list[dict[str, Any]] = []  # the open alarms as of the last event (replaced, never mutated)
        self.q: queue.Queue[tuple[str, dict[str, Any] | None, list[dict[str, Any]]] | None] = queue.Queue(QUEUE)
        self.sent = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="alarm-webhook", daemon=True)

    def start(self) -> None:
        if self.urls:
            self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self.q.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=TIMEOUT_S * len(self.urls) + 1)

    def notify(self, event: str, alarm: dict[str, Any] | None, alarms: list[dict[str, Any]]) -> None:
        """Called on the event loop with plain-dict copies; the thread only reads them."""
        self.latest = alarms
        if not self.urls:
            return
        try:
            self.q.put_nowait((event, alarm, alarms))
        except queue.Full:
            log.warning("alarm webhook: queue full, event %s dropped (the next state carries it)", event)

    def _run(self) -> None:
        while True:
            try:
                item = self.q.get(timeout=self.repeat_s)
            except queue.Empty:
                item = ("state", None, self.latest)
            if item is None:
                return
            self._post(*item)

    @staticmethod
    def body(event: str, alarm: dict[str, Any] | None, alarms: list[dict[str, Any]]) -> bytes:
        return json.dumps(
            {
                "type": "alarms",
                "event": event,
                "alarm": alarm,
                "alarms": alarms,
                "active": any(a["active"] for a in alarms),
                "unacknowledged": any(a["acked_at"] is None for a in alarms),
                "sent_at": time.time(),
            }
        ).encode()

    def _post(self, event: str, alarm: dict[str, Any] | None, alarms: list[dict[str, Any]]) -> None:
        body = self.body(event, alarm, alarms)
        headers = {"content-type": "application/json"}
        if self.secret is not None:
            headers[SIGNATURE] = sign(self.secret, body)
        for url in self.urls:
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                    resp.read(1024)
                self.sent += 1
            except OSError as exc:
                self.failed += 1
                if self.on_failure is not None:
                    self.on_failure()
                log.warning("alarm webhook %s: %s", url, str(exc)[:200])
