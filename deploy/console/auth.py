"""Logins, sessions, roles and CSRF for the console.

Passwords: argon2id (argon2-cffi) hashes in the config. Sessions: random server-side tokens in
an HttpOnly, SameSite=Strict cookie (lost on restart: users log in again). Every state change
needs the session's CSRF token (header ``X-CSRF-Token`` or form field ``csrf``) and, when the
browser sends one, an Origin equal to the console's own. Kiosk mode: a read-only "kiosk"
identity without login (the live page only; no review, no export).
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from deploy.console.config import ConsoleConfig

COOKIE = "ds_session"
hasher = PasswordHasher()  # argon2id, library defaults (64 MiB, t=3)
_DUMMY = hasher.hash("not a password")  # unknown users cost the same time as wrong passwords
CAN = {
    "view": {"kiosk", "operator", "engineer"},
    "review": {"operator", "engineer"},
    "export": {"engineer"},
}


@dataclass
class Session:
    user: str
    role: str
    csrf: str
    expires: float


class Sessions:
    def __init__(self, cfg: ConsoleConfig) -> None:
        self.cfg = cfg
        self._by_token: dict[str, Session] = {}

    def login(self, name: str, password: str) -> tuple[str, Session] | None:
        user = next((u for u in self.cfg.users if u.name == name), None)
        try:
            hasher.verify(user.password_hash if user else _DUMMY, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if user is None:
            return None
        token = secrets.token_urlsafe(32)
        s = Session(user.name, user.role, secrets.token_urlsafe(24), time.time() + self.cfg.server.session_max_age_s)
        self._by_token[token] = s
        self._expire()
        return token, s

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        s = self._by_token.get(token)
        if s is None or s.expires < time.time():
            self._by_token.pop(token, None)
            return None
        return s

    def logout(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)

    def _expire(self) -> None:
        now = time.time()
        for t in [t for t, s in self._by_token.items() if s.expires < now]:
            del self._by_token[t]


def csrf_ok(session: Session, supplied: str | None) -> bool:
    return bool(supplied) and hmac.compare_digest(session.csrf, supplied or "")


def hash_password(password: str) -> str:
    return hasher.hash(password)
