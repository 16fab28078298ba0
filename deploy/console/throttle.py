"""Rate limits: a token bucket per station stream, and login throttling per user and per client address.

Login: after ``max_failures`` failed attempts a user name (and, separately, a client address) is
locked for ``lockout_s``, doubling with each further failure up to ``lockout_max_s`` (as
django-axes / Flask-Limiter do); a success clears the user's and the address's record. While
locked, even the right password is refused (429 + Retry-After) without hashing it. Records are
kept for at most MAX_TRACKED names and addresses (oldest dropped), so spraying names cannot grow
memory without bound.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_TRACKED = 10_000


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; rate 0 = unlimited."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = burst
        self.at = clock()

    def take(self, n: float = 1.0) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0


class LoginThrottle:
    def __init__(
        self, max_failures: int, lockout_s: float, lockout_max_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_failures, self.lockout_s, self.lockout_max_s = max_failures, lockout_s, lockout_max_s
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def retry_after(self, user: str, address: str) -> tuple[str, int] | None:
        """(``"user"`` | ``"address"``, seconds to wait) while either is locked, else None."""
        now = self.clock()
        for kind, key in (("user", f"u:{user}"), ("address", f"a:{address}")):
            rec = self._records.get(key)
            if rec is not None and rec.locked_until > now:
                return kind, max(1, math.ceil(rec.locked_until - now))
        return None

    def failed(self, user: str, address: str) -> None:
        now = self.clock()
        for key in (f"u:{user}", f"a:{address}"):
            rec = self._records.pop(key, None) or _Record()
            rec.failures += 1
            over = rec.failures - self.max_failures
            if over >= 0:
                rec.locked_until = now + min(self.lockout_max_s, self.lockout_s * 2.0 ** min(over, 32))
            self._records[key] = rec  # most recent last
            while len(self._records) > MAX_TRACKED:
                self._records.popitem(last=False)

    def succeeded(self, user: str, address: str) -> None:
        self._records.pop(f"u:{user}", None)
        self._records.pop(f"a:{address}", None)
