"""ZeroMQ publisher of the verdict stream.

An XPUB socket (a PUB that also sees subscriptions, so a replay can wait for
its subscribers): SNDHWM bounds what is queued per subscriber, beyond which
that subscriber's messages are dropped, so a slow or dead subscriber never
stalls the pipeline. Optional CURVE encryption with zmq.auth certificate files
(and client authentication against a directory of client public keys).
All sends happen on one thread (the daemon's output thread).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Mapping
from typing import Any

import zmq

from runtime.config import PublisherConfig
from runtime.config_types import curve_allow_list_error
from runtime.messages import encode

log = logging.getLogger("defectscope.publisher")


class PublisherError(RuntimeError):
    """The publisher could not be set up; the message names the config key."""


def check_secret_key_file(path: os.PathLike[str] | str) -> None:
    """Refuse a CURVE secret key that another local account could read (or swap)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PublisherError(f"key 'publisher.curve.server_secret_key': {path}: {exc.strerror or exc}") from None
    if st.st_mode & 0o077:
        raise PublisherError(
            f"key 'publisher.curve.server_secret_key': {path} has mode "
            f"{stat.S_IMODE(st.st_mode):04o}; a secret key must not be readable or writable by "
            "group or others (chmod 600, owned by the daemon's user)"
        )


class Publisher:
    def __init__(self, cfg: PublisherConfig) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.auth: Any = None  # zmq.auth ThreadAuthenticator with CURVE
        sock = self.ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, cfg.sndhwm)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscribe reaches us (subscriber counting)
        sock.setsockopt(zmq.LINGER, 0)
        # Subscribers only send (un)subscriptions; a larger message disconnects that peer unbuffered.
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_inbound_bytes)
        if cfg.sndbuf:
            sock.setsockopt(zmq.SNDBUF, cfg.sndbuf)
        try:
            if cfg.curve is not None:
                self._setup_curve(sock)
            self.endpoints: list[str] = []
            for ep in cfg.bind:
                try:
                    sock.bind(ep)
                except zmq.ZMQError as exc:
                    raise PublisherError(f"key 'publisher.bind': cannot bind {ep!r}: {exc}") from None
                self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except BaseException:
            sock.close(0)
            self._stop_auth()
            self.ctx.term()
            raise
        self.sock: zmq.Socket | None = sock  # None once closed
        self.fmt = cfg.format
        self.subscriptions = 0  # subscribe minus unsubscribe messages seen

    def _setup_curve(self, sock: zmq.Socket) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        curve = self.cfg.curve
        assert curve is not None
        if (why := curve_allow_list_error(curve)) is not None:
            raise PublisherError(f"key 'publisher.curve.authorized_clients': {why}")
        check_secret_key_file(curve.server_secret_key)
        try:
            public, secret = zmq.auth.load_certificate(str(curve.server_secret_key))
        except (OSError, ValueError) as exc:
            raise PublisherError(f"key 'publisher.curve.server_secret_key': {exc}") from None
        if not secret:
            raise PublisherError(
                f"key 'publisher.curve.server_secret_key': {curve.server_secret_key} holds no "
                "secret key (use the .key_secret file from zmq.auth.create_certificates)"
            )
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        if curve.authorized_clients is not None:
            self.auth.configure_curve(domain="*", location=str(curve.authorized_clients))
            log.info("CURVE: only the client keys in %s may subscribe", curve.authorized_clients)
        else:  # allow_any_client = true, checked above
            self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
            log.warning(
                "CURVE: allow_any_client = true: any client key may subscribe (the stream is "
                "encrypted, but not restricted to known clients)"
            )
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def send(self, topic: str, message: Mapping[str, Any]) -> bool:
        """Publish without ever blocking; False when the message could not be queued (or the socket is closed)."""
        if self.sock is None:
            return False
        try:
            self.sock.send_multipart([topic.encode("utf-8"), encode(message, self.fmt)], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except (zmq.ZMQError, ValueError, TypeError) as exc:
            log.error("publish failed: %s", exc)
            return False

    def poll_subscriptions(self) -> int:
        """Consume pending (un)subscribe notifications; returns the current subscription count."""
        while self.sock is not None:
            try:
                msg = self.sock.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[:1] == b"\x01":
                self.subscriptions += 1
            elif msg[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)
        return self.subscriptions

    def wait_for_subscribers(self, n: int, timeout_s: float, stop: Any = None) -> bool:
        """Block until ``n`` subscriptions arrived (replays that must not lose their first frames)."""
        deadline = time.monotonic() + timeout_s
        while self.poll_subscriptions() < n:
            if self.sock is None or time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return False
            self.sock.poll(50, zmq.POLLIN)
        return True

    def close(self, linger_s: float = 2.0) -> None:
        """Close, giving queued messages ``linger_s`` to reach connected subscribers."""
        if self.sock is None:
            return
        self.sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
        self.sock.close()
        self.sock = None
        self._stop_auth()
        self.ctx.term()

    def _stop_auth(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
