"""CURVE key files of the verdict stream: the secret-key permission rule, and the client side that
every subscriber (``watch``, the line console, the PLC bridge) applies the same way."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any


class CurveKeyError(ValueError):
    """A key file that cannot be used; the message names the config key and the file."""


def secret_key_problem(path: os.PathLike[str] | str) -> str | None:
    """Why ``path`` must not be used as a CURVE secret key (unreadable, or open to other accounts), else None."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if st.st_mode & 0o077:
        return (
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; a secret key must not be readable or writable by "
            "group or others (chmod 600, owned by the account that uses it)"
        )
    return None


@dataclass(frozen=True)
class ClientKeys:
    """Z85 keys of one subscriber: the station's public key, the client's own pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: Any) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def client_keys(
    server_public_key: os.PathLike[str] | str, client_secret_key: os.PathLike[str] | str, key: str
) -> ClientKeys:
    """Load a subscriber's keys; ``key`` names the config table (``stations[0].curve``) in errors."""
    from zmq import auth as zauth

    if why := secret_key_problem(client_secret_key):
        raise CurveKeyError(f"key '{key}.client_secret_key': {why}")
    try:
        server_public, _ = zauth.load_certificate(os.fspath(server_public_key))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"key '{key}.server_public_key': {server_public_key}: {exc}") from None
    try:
        public, secret = zauth.load_certificate(os.fspath(client_secret_key))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"key '{key}.client_secret_key': {client_secret_key}: {exc}") from None
    if not secret:
        raise CurveKeyError(
            f"key '{key}.client_secret_key': {client_secret_key} holds no secret key (use the .key_secret file)"
        )
    return ClientKeys(server_public, public, secret)
