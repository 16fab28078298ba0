"""Console users in the database: add, change password or role, disable; the TOML only seeds them.

A ``[[users]]`` entry of the config is inserted when no user of that name exists yet (the first
admin on a new site); after that the database is the truth, so a password changed on the admin
page or with ``defectscope console user passwd`` survives restarts. Disabling a user or setting
their password ends all their sessions (the console notices within ``SESSION_CACHE_S``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from deploy.console.config import NAME, ROLES, User
from deploy.console.store import sessions, users

MIN_PASSWORD = 8  # characters


class UserError(ValueError):
    """A refused user change (unknown user, bad name or role, short password); the message says why."""


@dataclass(frozen=True)
class UserRow:
    name: str
    role: str
    password_hash: str
    disabled: bool
    created_at: float
    updated_at: float


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise UserError("a password may have at most 1024 characters")


def _check(name: str, role: str | None) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise UserError(f"user name {name!r}: expected letters, digits, '_', '-' (at most 64)")
    if role is not None and role not in ROLES:
        raise UserError(f"role {role!r}: expected one of {ROLES}")


class Users:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def seed(self, seeds: Iterable[User]) -> list[str]:
        """Insert the config's users that do not exist yet; returns their names."""
        added = []
        for u in seeds:
            if self.get(u.name) is None:
                self._insert(u.name, u.role, u.password_hash)
                added.append(u.name)
        return added

    def _insert(self, name: str, role: str, password_hash: str) -> None:
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    users.insert(),
                    [
                        {
                            "name": name,
                            "role": role,
                            "password_hash": password_hash,
                            "disabled": False,
                            "created_at": now,
                            "updated_at": now,
                        }
                    ],
                )
        except sa.exc.IntegrityError:
            raise UserError(f"user {name!r} exists already") from None

    def add(self, name: str, role: str, password: str) -> None:
        from deploy.console.auth import hash_password

        _check(name, role)
        check_password(password)
        self._insert(name, role, hash_password(password))

    def get(self, name: str) -> UserRow | None:
        with self.engine.connect() as conn:
            m = conn.execute(sa.select(users).where(users.c.name == name)).mappings().first()
        return None if m is None else UserRow(**dict(m))

    def all(self) -> list[UserRow]:
        with self.engine.connect() as conn:
            return [UserRow(**dict(m)) for m in conn.execute(sa.select(users).order_by(users.c.name)).mappings()]

    def _update(self, name: str, end_sessions: bool, keep_token_hash: str | None = None, **values: Any) -> None:
        with self.engine.begin() as conn:
            res = conn.execute(users.update().where(users.c.name == name).values(updated_at=time.time(), **values))
            if not res.rowcount:
                raise UserError(f"no user {name!r}")
            if end_sessions:
                q = sessions.delete().where(sessions.c.user == name)
                if keep_token_hash is not None:
                    q = q.where(sessions.c.token_hash != keep_token_hash)
                conn.execute(q)

    def set_password(self, name: str, password: str, keep_token_hash: str | None = None) -> None:
        """New password; ends the user's sessions except ``keep_token_hash`` (their own, changing it)."""
        from deploy.console.auth import hash_password

        check_password(password)
        self._update(name, True, keep_token_hash, password_hash=hash_password(password))

    def set_role(self, name: str, role: str) -> None:
        _check(name, role)
        self._update(name, True, role=role)

    def set_disabled(self, name: str, disabled: bool) -> None:
        self._update(name, disabled, disabled=disabled)

    def public(self) -> list[dict[str, Any]]:
        return [
            {
                "name": u.name,
                "role": u.role,
                "disabled": u.disabled,
                "created_at": u.created_at,
                "updated_at": u.updated_at,
            }
            for u in self.all()
        ]
