"""Logins, sessions, roles and CSRF for the console.

Passwords: argon2id (argon2-cffi) hashes in the ``users`` table (deploy/console/users.py).
Sessions: random tokens in an HttpOnly, SameSite=Strict cookie; the database keeps only their
sha256 (table ``sessions``), so a session survives a console restart and a database leak is no
login. Lookups are cached for ``SESSION_CACHE_S`` (the WebSocket checks its session before each
push): a logout here is seen at once, a user disabled from the CLI within that time. Every
state change needs the session's CSRF token (header ``X-CSRF-Token`` or form field ``csrf``)
and, when the browser sends one, an Origin equal to the console's own. Kiosk mode: a read-only
"kiosk" identity without login (the live page only; no review, no export).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from deploy.console.store import sessions as sessions_table
from deploy.console.users import Users

COOKIE = "ds_session"
SESSION_CACHE_S = 2.0
hasher = PasswordHasher()  # argon2id, library defaults (64 MiB, t=3)
_DUMMY = hasher.hash("not a password")  # unknown users cost the same time as wrong passwords
CAN = {
    "view": {"kiosk", "operator", "engineer", "admin"},
    "review": {"operator", "engineer", "admin"},
    "export": {"engineer", "admin"},
    "admin": {"admin"},
}


@dataclass
class Session:
    user: str
    role: str
    csrf: str
    expires: float
    token_hash: str = ""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    def __init__(self, users: Users, max_age_s: float) -> None:
        self.users = users
        self.engine = users.engine
        self.max_age_s = max_age_s
        self._cache: dict[str, tuple[float, Session | None]] = {}  # token hash -> (looked up at, session)

    def login(self, name: str, password: str) -> tuple[str, Session] | None:
        user = self.users.get(name)
        try:
            hasher.verify(user.password_hash if user else _DUMMY, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if user is None or user.disabled:
            return None
        token = secrets.token_urlsafe(32)
        now = time.time()
        s = Session(user.name, user.role, secrets.token_urlsafe(24), now + self.max_age_s, token_hash(token))
        with self.engine.begin() as conn:
            conn.execute(sessions_table.delete().where(sessions_table.c.expires < now))
            conn.execute(
                sessions_table.insert(),
                [
                    {
                        "token_hash": s.token_hash,
                        "user": s.user,
                        "role": s.role,
                        "csrf": s.csrf,
                        "created_at": now,
                        "expires": s.expires,
                    }
                ],
            )
        return token, s

    def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        h = token_hash(token)
        now = time.time()
        hit = self._cache.get(h)
        if hit is None or now - hit[0] > SESSION_CACHE_S:
            s = self._load(h)
            if len(self._cache) > 4096:  # bounded: forged tokens must not grow it
                self._cache.clear()
            self._cache[h] = (now, s)
        else:
            s = hit[1]
        if s is None or s.expires < now:
            return None
        return s

    def _load(self, h: str) -> Session | None:
        from deploy.console.store import users as users_table

        q = (
            sa.select(sessions_table, users_table.c.disabled, users_table.c.role.label("current_role"))
            .select_from(sessions_table.join(users_table, users_table.c.name == sessions_table.c.user))
            .where(sessions_table.c.token_hash == h)
        )
        try:
            with self.engine.connect() as conn:
                m = conn.execute(q).mappings().first()
        except sa.exc.SQLAlchemyError:
            return None  # database unreachable: no session (the page sends the user to log in)
        if m is None or m["disabled"] or m["current_role"] != m["role"]:
            return None
        return Session(m["user"], m["role"], m["csrf"], m["expires"], h)

    def logout(self, token: str | None) -> None:
        if token:
            h = token_hash(token)
            self._cache.pop(h, None)
            with self.engine.begin() as conn:
                conn.execute(sessions_table.delete().where(sessions_table.c.token_hash == h))

    def forget(self) -> None:
        """Drop the lookup cache (after a change to users made here)."""
        self._cache.clear()


def csrf_ok(session: Session, supplied: str | None) -> bool:
    return bool(supplied) and hmac.compare_digest(session.csrf, supplied or "")


def hash_password(password: str) -> str:
    return hasher.hash(password)
