"""ZeroMQ publisher of the verdict stream.

An XPUB socket in manual mode (a PUB that hands every subscription to the daemon, which
applies it within runtime.serving.subscriptions' limits; a replay can wait for its subscribers):
SNDHWM bounds what is queued per subscriber, beyond which that subscriber's messages are
dropped, so a slow or dead subscriber never stalls the pipeline. CURVE encryption with
zmq.auth certificate files and client authentication against a directory of client public
keys (or, said explicitly, any client). All calls happen on one thread (the daemon's
output thread); each send first applies the subscriptions that arrived.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from runtime.config.station import PublisherConfig
from runtime.config.types import curve_allow_list_error
from runtime.serving.curve_keys import secret_key_problem
from runtime.serving.messages import encode
from runtime.serving.subscriptions import SubscriptionGate

log = logging.getLogger("defectscope.publisher")


class PublisherError(RuntimeError):
    """The publisher could not be set up; the message names the config key."""


def check_secret_key_file(path: os.PathLike[str] | str) -> None:
    """Refuse a CURVE secret key that another local account could read (or swap)."""
    if why := secret_key_problem(path):
        raise PublisherError(f"key 'publisher.curve.server_secret_key': {why}")


# What libzmq reads from one subscriber ahead of the daemon: messages queued in its pipe, and
# the kernel's receive buffer (bytes, doubled by Linux). Subscribers send a few short topics; small
# values leave less of a flood to land in libzmq's trie before the gate drops the peer.
_INBOUND_HWM = 4
_INBOUND_RCVBUF = 4096
_ZAP_DOMAIN = "defectscope"  # the socket's ZAP domain; pyzmq looks client keys up by it


class Publisher:
    def __init__(self, cfg: PublisherConfig, on_drop: Callable[[str], None] = lambda reason: None) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.auth: Any = None  # zmq.auth ThreadAuthenticator: CURVE keys and the gate's banned addresses
        sock = self.ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, cfg.sndhwm)
        sock.setsockopt(zmq.XPUB_MANUAL, 1)  # every (un)subscription reaches the gate, which applies it or not
        sock.setsockopt(zmq.LINGER, 0)
        # Subscribers only send (un)subscriptions; a larger message disconnects that peer unbuffered.
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_inbound_bytes)
        sock.setsockopt(zmq.RCVHWM, _INBOUND_HWM)
        sock.setsockopt(zmq.RCVBUF, _INBOUND_RCVBUF)
        if cfg.sndbuf:
            sock.setsockopt(zmq.SNDBUF, cfg.sndbuf)
        self.gate = SubscriptionGate(sock, cfg, on_drop)  # the monitor sees every accepted connection
        try:
            if cfg.curve is not None:
                self._setup_curve(sock)
            else:
                self._start_auth()
            # ZAP runs for plain (NULL) peers only with a domain; it refuses the addresses the gate banned
            # during their handshake, before any subscription of theirs is read.
            sock.zap_domain = _ZAP_DOMAIN.encode()
            self.gate.auth = self.auth
            self.endpoints: list[str] = []
            for ep in cfg.bind:
                try:
                    sock.bind(ep)
                except zmq.ZMQError as exc:
                    raise PublisherError(f"key 'publisher.bind': cannot bind {ep!r}: {exc}") from None
                self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except BaseException:
            self.gate.close()
            sock.close(0)
            self._stop_auth()
            self.ctx.term()
            raise
        self.sock: zmq.Socket | None = sock  # None once closed
        self.fmt = cfg.format

    @property
    def subscriptions(self) -> int:
        """Subscriptions applied (within the limits), all subscribers."""
        return self.gate.count

    def _start_auth(self) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("defectscope.publisher.zap"))
        self.auth.start()

    def _setup_curve(self, sock: zmq.Socket) -> None:
        import zmq.auth

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
        self._start_auth()
        if curve.authorized_clients is not None:
            self.auth.configure_curve(domain=_ZAP_DOMAIN, location=str(curve.authorized_clients))
            log.info("CURVE: only the client keys in %s may subscribe", curve.authorized_clients)
        else:  # allow_any_client = true, checked above
            self.auth.configure_curve(domain=_ZAP_DOMAIN, location=zmq.auth.CURVE_ALLOW_ANY)
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
        self.poll_subscriptions()  # sends let libzmq take in subscriptions: judge them at once
        try:
            self.sock.send_multipart([topic.encode("utf-8"), encode(message, self.fmt)], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except (zmq.ZMQError, ValueError, TypeError) as exc:
            log.error("publish failed: %s", exc)
            return False

    def poll_subscriptions(self) -> int:
        """Apply (or refuse) pending (un)subscriptions; returns the applied subscription count."""
        if self.sock is None:
            return 0
        self.gate.events()
        while True:
            try:
                frame = self.sock.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.gate.handle(frame)
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
        self.gate.close()
        self.sock.close()
        self.sock = None
        self._stop_auth()
        self.ctx.term()

    def _stop_auth(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
