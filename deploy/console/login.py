"""The login gate: throttling per user and per client address, and a bound on concurrent argon2 hashes.

Each argon2id verification takes 64 MiB and tens of ms of CPU; at most ``login_max_concurrent``
run at once (the rest wait their turn, up to MAX_WAITING of them; beyond that the console answers
429 at once). A locked user or address is refused before its password is hashed, and checked
again after waiting for a slot, since failures may have landed meanwhile.
"""

from __future__ import annotations

import asyncio

from deploy.console.auth import Session, Sessions
from deploy.console.config import ServerConfig
from deploy.console.metrics import ConsoleMetrics
from deploy.console.throttle import LoginThrottle

MAX_WAITING = 32  # logins queued for a hash slot


class LoginGate:
    def __init__(self, server: ServerConfig, sessions: Sessions, metrics: ConsoleMetrics) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.throttle = LoginThrottle(server.login_max_failures, server.login_lockout_s, server.login_lockout_max_s)
        self.slots = asyncio.Semaphore(server.login_max_concurrent)
        self.waiting = 0
        self.in_flight = 0
        self.peak = 0

    def _locked(self, user: str, address: str) -> int | None:
        locked = self.throttle.retry_after(user, address)
        if locked is None:
            return None
        self.metrics.login_refused.labels(f"locked_{locked[0]}").inc()
        return locked[1]

    async def login(self, user: str, password: str, address: str) -> tuple[str, Session] | int | None:
        """(token, session) on success, None for a wrong password, or the seconds to wait (429)."""
        wait = self._locked(user, address)
        if wait is not None:
            return wait
        if self.waiting >= MAX_WAITING:
            self.metrics.login_refused.labels("busy").inc()
            return 1
        self.waiting += 1
        try:
            async with self.slots:
                wait = self._locked(user, address)
                if wait is not None:
                    return wait
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                self.metrics.hashes_in_flight.set(self.in_flight)
                self.metrics.hashes_peak.set(self.peak)
                try:
                    got = await asyncio.to_thread(self.sessions.login, user, password)
                finally:
                    self.in_flight -= 1
                    self.metrics.hashes_in_flight.set(self.in_flight)
        finally:
            self.waiting -= 1
        if got is None:
            self.throttle.failed(user, address)
            self.metrics.login_refused.labels("wrong_password").inc()
            return None
        self.throttle.succeeded(user, address)
        return got
