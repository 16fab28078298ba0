"""Subscription limits of the verdict publisher: what each peer may subscribe, and dropping it.

libzmq keeps every subscription it receives in a byte trie (about 48 bytes per topic byte, never
shared between distinct suffixes): 100,000 distinct 999-byte topics from one peer cost ~4.7 GiB.
Manual mode (``ZMQ_XPUB_MANUAL``) hands each (un)subscription to the daemon, which applies only
those within the limits; but libzmq 4.3.3+ still records every received subscription per
connection (to unsubscribe it when the connection ends), so the memory is only bounded once the
peer's connection is gone. libzmq cannot disconnect one peer of a bound socket, so the gate
tracks accepted connections through the socket monitor (``ZMQ_EVENT_ACCEPTED`` carries the file
descriptor) and shuts those of an over-limit peer down (``shutdown(2)``: libzmq sees the
connection ends and frees its subscriptions; further data from the peer is answered with RST).
A dropped peer is then refused for ``[publisher] drop_ban_s``: its IP address is denied by the publisher's ZAP
handler (the handshake fails, nothing it sends is read), and any connection of it that still
arrives (IPC peers, or accepted before the ban) is shut down as soon as the monitor reports it.

A peer is what libzmq reports as a message's ``Peer-Address``: the IP address for TCP,
``:uid:gid:pid`` for IPC. Per-peer limits are per host (several subscribers on one host share
them); the totals bound all peers together. All calls happen on the publisher's thread.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from runtime.config.types import PublisherConfig
from runtime.serving.metrics import SUBSCRIBER_DROP_REASONS as DROP_REASONS

log = logging.getLogger("defectscope.publisher")

__all__ = ["DROP_REASONS", "SubscriptionGate", "peer_key"]
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
_GONE_S = 10.0  # a peer whose connection ended this recently owns libzmq's unsubscriptions of it
_IPC_HOST = re.compile(r"^[^:]+(?=:\d+:\d+:\d+$)")
_LOG_INTERVAL_S = 60.0  # drops are logged at once, then summed into one line per interval


@dataclass
class _Peer:
    topics: Counter[bytes] = field(default_factory=Counter)  # applied subscriptions
    count: int = 0
    size: int = 0  # bytes of applied topics
    banned_until: float = 0.0  # time.monotonic(): until then its connections are shut down on arrival


def peer_key(fd: int) -> str | None:
    """The ``Peer-Address`` libzmq reports for the connection on ``fd`` (None: not a socket now)."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if s.family == socket.AF_UNIX:
            pid, uid, gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f":{uid}:{gid}:{pid}"
        return str(s.getpeername()[0])
    except OSError:
        return None
    finally:
        s.detach()  # the descriptor stays libzmq's


def _shutdown(fd: int) -> None:
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.detach()


class SubscriptionGate:
    """Applies a manual-mode XPUB's subscriptions within the configured limits."""

    def __init__(self, sock: zmq.Socket, cfg: PublisherConfig, on_drop: Callable[[str], None]) -> None:
        self.sock, self.cfg, self.on_drop = sock, cfg, on_drop
        self.monitor: zmq.Socket | None = sock.get_monitor_socket(_EVENTS)
        self.fds: dict[int, str | None] = {}  # accepted connection -> peer
        self.shut: set[int] = set()  # connections shut down, not yet reported gone
        self.auth: Any = None  # the publisher's zmq.auth Authenticator (set once started)
        self.denied: dict[str, float] = {}  # addresses denied by ZAP -> until (monotonic)
        self.peers: dict[str, _Peer] = {}
        self.gone: dict[str, float] = {}  # peer -> when one of its connections ended (monotonic)
        self.count = 0  # applied subscriptions, all peers
        self.size = 0
        self._next_log = 0.0
        self._unlogged = 0

    def close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.monitor = None

    # ---- connections -------------------------------------------------------------------------
    def events(self) -> None:
        """Track accepted connections and their ends from the socket monitor."""
        if self.denied:
            self._lift_bans()
        while self.monitor is not None:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(ev["value"])
            self.shut.discard(fd)
            if ev["event"] == zmq.EVENT_ACCEPTED:
                key = self.fds[fd] = peer_key(fd)
                peer = self.peers.get(key) if key is not None else None
                if peer is not None and peer.banned_until > time.monotonic():
                    self._shut(fd)
            elif fd in self.fds:
                self._ended(self.fds.pop(fd))

    def _ended(self, key: str | None) -> None:
        now = time.monotonic()
        if key is not None:  # None: the connection was gone before its address could be read
            self.gone[key] = now
        for k in [k for k, t in self.gone.items() if now - t > _GONE_S]:
            del self.gone[k]
        # A peer without a connection holds no subscriptions in libzmq: forget its count (a dropped
        # peer is remembered, with nothing applied, until its ban ends).
        live = set(self.fds.values())
        for k in [k for k, p in self.peers.items() if k not in live and p.banned_until <= now]:
            peer = self.peers.pop(k)
            self.count -= peer.count
            self.size -= peer.size

    def _deny(self, key: str, until: float) -> None:
        # pyzmq's Authenticator.deny() adds to the set its handler checks; it has no public inverse.
        denied = getattr(self.auth, "_denied", None)
        if isinstance(denied, set) and key and not key.startswith(":"):  # IP addresses; ":uid:gid:pid" is IPC
            denied.add(key)
            self.denied[key] = until

    def _lift_bans(self) -> None:
        now = time.monotonic()
        for key in [k for k, until in self.denied.items() if until <= now]:
            del self.denied[key]
            getattr(self.auth, "_denied", set()).discard(key)

    def _shut(self, fd: int) -> None:
        self.shut.add(fd)
        _shutdown(fd)

    # ---- (un)subscriptions ---------------------------------------------------------------------
    def handle(self, frame: zmq.Frame) -> None:
        data = frame.bytes
        if not data or data[0] > 1:
            return  # not an (un)subscription: nothing to apply
        topic = data[1:]
        try:
            # glibc names a unix socket's peer "localhost:uid:gid:pid"; peer_key() gives ":uid:gid:pid".
            key: str | None = _IPC_HOST.sub("", str(frame.get("Peer-Address")))
        except zmq.ZMQError:
            key = None  # no metadata: libzmq's own unsubscription for a connection that ended
        if data[0] == 0:
            self._unsubscribe(key, topic)
        else:
            self._subscribe(key or "", topic)

    def _subscribe(self, key: str, topic: bytes) -> None:
        self.events()
        if key and key not in self.fds.values():
            return  # its connection is gone already (libzmq applies nothing to it): do not count it
        peer = self.peers.setdefault(key, _Peer())
        if peer.banned_until > time.monotonic():  # still arriving from a dropped peer's connections
            self._shut_peer(key)
            return
        c = self.cfg
        n = len(topic)
        if peer.count >= c.max_subscriptions_per_peer or peer.size + n > c.max_subscription_bytes_per_peer:
            self._drop(key, peer, "peer_limit")
        elif self.count >= c.max_subscriptions or self.size + n > c.max_subscription_bytes:
            self._drop(key, peer, "total_limit")
        else:
            peer.topics[topic] += 1
            peer.count += 1
            peer.size += n
            self.count += 1
            self.size += n
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)  # to the connection it came from (libzmq: last pipe)

    def _unsubscribe(self, key: str | None, topic: bytes) -> None:
        if key is not None:
            self.sock.setsockopt(zmq.UNSUBSCRIBE, topic)
            owners = [key]
        else:  # libzmq removed it already; whose was it? a peer whose connection just ended
            self.events()
            owners = [k for k in self.gone if k in self.peers]
        for k in owners:
            peer = self.peers.get(k)
            if peer is not None and peer.topics[topic] > 0:
                peer.topics[topic] -= 1
                if not peer.topics[topic]:
                    del peer.topics[topic]
                peer.count -= 1
                peer.size -= len(topic)
                self.count -= 1
                self.size -= len(topic)
                return

    def _shut_peer(self, key: str) -> int:
        """Shut down every connection of ``key`` not shut down yet; returns how many."""
        fds = [fd for fd, k in self.fds.items() if k == key and fd not in self.shut]
        for fd in fds:
            if peer_key(fd) == key:  # checked again: a closed descriptor's number is reused
                self._shut(fd)
        return len(fds)

    def _drop(self, key: str, peer: _Peer, reason: str) -> None:
        """Shut down every connection of ``key`` (its subscriptions end with them) and ban it a while."""
        self.count -= peer.count
        self.size -= peer.size
        peer.topics.clear()
        peer.count = peer.size = 0
        peer.banned_until = time.monotonic() + self.cfg.drop_ban_s
        self._deny(key, peer.banned_until)
        shut = self._shut_peer(key)
        self.on_drop(reason)
        now = time.monotonic()
        if now < self._next_log:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more drops in the last {_LOG_INTERVAL_S:.0f}s)" if self._unlogged else ""
        c = self.cfg
        log.warning(
            "publisher: dropped subscriber %s (%d connection(s), refused for %.0fs): %s%s",
            key or "(in-process)",
            shut,
            self.cfg.drop_ban_s,
            f"more than {c.max_subscriptions_per_peer} subscriptions or {c.max_subscription_bytes_per_peer} "
            "bytes of topics from one peer"
            if reason == "peer_limit"
            else f"all subscribers together above {c.max_subscriptions} subscriptions or "
            f"{c.max_subscription_bytes} bytes of topics",
            more,
        )
        self._next_log, self._unlogged = now + _LOG_INTERVAL_S, 0
