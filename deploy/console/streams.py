"""Station stream subscribers, the store writer and the browser broadcaster (asyncio tasks).

One ZeroMQ SUB socket per configured station (CURVE client keys when configured), subscribed to
``<station>.`` (verdicts + heartbeats) and ``_preview.<station>.``. ZeroMQ reconnects by itself,
so a station that starts after the console appears when its first heartbeat arrives. A message
whose ``station`` field is not the station configured for that endpoint is rejected (a station
cannot write another station's history).

Hostile-station limits: the socket drops messages over MAX_SOCKET_BYTES (previews included); a
verdict or heartbeat over runtime.serving.messages.MAX_MESSAGE_BYTES is refused before it is parsed; each
station has a token bucket in messages and in bytes per second (``server.station_max_*``); every
refusal is counted in ``defectscope_console_messages_rejected_total{station,reason}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from deploy.console.alarms import Alarms
from deploy.console.config import NAME, ConsoleConfig, StationEntry
from deploy.console.live import MAX_CAMERAS, Live, dumps
from deploy.console.metrics import ConsoleMetrics
from deploy.console.store import Store, StoreUnavailable, row_from_message
from deploy.console.throttle import TokenBucket
from runtime.serving.messages import MAX_MESSAGE_BYTES, SchemaError, decode, validate
from runtime.serving.preview import MAX_JPEG_BYTES, PREVIEW_PREFIX, decode_preview

log = logging.getLogger("defectscope.console")
PRUNE_EVERY_S = 600.0
# A larger ZeroMQ message makes the socket drop the station's connection (ZeroMQ reconnects); below
# it, a preview (base64 JPEG) is checked by decode_preview and anything else by MAX_MESSAGE_BYTES.
MAX_SOCKET_BYTES = max(1024 * 1024, MAX_JPEG_BYTES * 4 // 3 + 64 * 1024)
RCVHWM = 1000  # messages queued per station while the console is busy (~0.5 s of a full station)
MAX_PENDING = 200_000  # rows held while the store is unreachable (~7 min of 16 cameras at 30/s)
KEEPALIVE_S = 1.0  # a browser hears at least this often, so it can tell a quiet feed from a lost one
TICK = '{"type":"tick"}'
DRAIN = RCVHWM  # messages of one station per wake-up at most (a full queue), then the other tasks run
BATCH_S = 0.05  # a busy station's subscriber wakes at most every this (or an eighth of coalesce_ms)
PREVIEW_TOPIC = PREVIEW_PREFIX.encode()


def _socket(ctx: zmq.asyncio.Context, st: StationEntry) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, RCVHWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_SOCKET_BYTES)
    sock.setsockopt(zmq.RECONNECT_IVL, 200)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if st.curve is not None:
        from runtime.serving.curve_keys import client_keys

        client_keys(st.curve.server_public_key, st.curve.client_secret_key, f"stations.{st.name}.curve").apply(sock)
    sock.setsockopt_string(zmq.SUBSCRIBE, f"{st.name}.")
    sock.setsockopt_string(zmq.SUBSCRIBE, f"{PREVIEW_PREFIX}{st.name}.")
    sock.connect(st.endpoint)
    return sock


class Streams:
    """Owns the subscriber, writer and broadcaster tasks of one console process."""

    def __init__(self, cfg: ConsoleConfig, store: Store, live: Live, metrics: ConsoleMetrics | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.live = live
        self.alarms: Alarms | None = None  # set by the app: rules fed from handle() and the broadcaster
        self.metrics = metrics or ConsoleMetrics()
        self.ctx = zmq.asyncio.Context()
        self.pending: list[dict[str, Any]] = []
        self.clients: dict[asyncio.Queue, str | None] = {}  # queue -> session token (None: kiosk)
        self.tasks: list[asyncio.Task] = []
        self.recorded = 0
        self.dead_letters = 0
        self._rejected_logged = 0.0
        srv = cfg.server
        self.buckets = {
            s.name: (
                TokenBucket(srv.station_max_msgs_per_s, srv.station_max_msgs_per_s),
                TokenBucket(srv.station_max_bytes_per_s, srv.station_max_bytes_per_s),
            )
            for s in cfg.stations
        }

    def start(self) -> None:
        for st in self.cfg.stations:
            self.tasks.append(asyncio.create_task(self._subscribe(st), name=f"sub-{st.name}"))
        self.tasks.append(asyncio.create_task(self._writer(), name="writer"))
        self.tasks.append(asyncio.create_task(self._broadcaster(), name="broadcaster"))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.to_thread(self._flush)
        self.ctx.destroy(0)

    def _reject(self, station: str, why: str, reason: str = "schema") -> None:
        self.live.received["rejected"] += 1
        self.metrics.rejected.labels(station, reason).inc()
        now = time.monotonic()
        if now - self._rejected_logged > 10.0:  # a misbehaving station must not flood the journal
            self._rejected_logged = now
            log.warning("station %s: message rejected: %s", station, why)

    def handle(self, st: StationEntry, topic: bytes, payload: bytes) -> None:
        msgs, nbytes = self.buckets[st.name]
        if not (msgs.take(1.0) and nbytes.take(float(len(topic) + len(payload)))):
            self._reject(st.name, "over the station's message rate (server.station_max_*)", "rate_limited")
            return
        preview = topic.startswith(PREVIEW_TOPIC)
        if not preview and len(payload) > MAX_MESSAGE_BYTES:
            self._reject(st.name, f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}", "too_large")
            return
        try:
            msg = decode(payload)
            if not isinstance(msg, dict):
                raise SchemaError("message is not an object")
            if msg.get("station") != st.name:
                self._reject(
                    st.name,
                    f"key 'station': {str(msg.get('station'))[:64]!r} on the stream of station {st.name!r}",
                    "foreign_station",
                )
                return
            if preview:
                jpeg = decode_preview(msg)
                cam = msg["camera"]
                if not NAME.match(cam) or not self.live.accepts({"type": "verdict", "station": st.name, "camera": cam}):
                    raise SchemaError("key 'camera': not a camera name, or one camera too many")
                if topic.decode("utf-8", "replace") != f"{PREVIEW_PREFIX}{st.name}.{cam}":
                    raise SchemaError("preview topic does not match its camera")
                self.live.on_preview(st.name, cam, jpeg)
                return
            validate(msg)
            if msg["type"] == "verdict" and not NAME.match(msg["camera"]):
                raise SchemaError(f"key 'camera': {msg['camera'][:40]!r} is not a camera name")
            if msg["type"] == "status" and not all(isinstance(c, str) and NAME.match(c) for c in msg["cameras"]):
                raise SchemaError("key 'cameras': a camera name is not letters, digits, '_', '-'")
            if not self.live.accepts(msg):
                raise SchemaError(f"more than {MAX_CAMERAS} cameras on one station")
        except (SchemaError, ValueError, TypeError, KeyError, RecursionError) as exc:
            self._reject(st.name, str(exc)[:200])
            return
        if msg["type"] == "status":
            self.live.on_status(msg)
            self._alarm("on_status", msg)
            return
        snap = msg.get("snapshot")
        snap_path = None
        if st.snapshot_dir is not None and isinstance(snap, str) and snap:
            snap_path = str(Path(st.snapshot_dir) / Path(snap).name)
        row = row_from_message(msg, snap_path)
        self.pending.append(row)
        self.live.on_verdict(msg, row["uid"])
        self._alarm("on_verdict", msg)

    def _alarm(self, method: str, *args: Any) -> None:
        """Feed the alarm rules; a store error there must not stop the stream (logged, retried next time)."""
        if self.alarms is None:
            return
        try:
            getattr(self.alarms, method)(*args)
        except Exception as exc:  # noqa: BLE001
            log.error("alarm rules: %s: %s", type(exc).__name__, str(exc)[:300])

    def alarm_message(self) -> str | None:
        if self.alarms is None:
            return None
        return dumps({"type": "alarms", "alarms": self.alarms.views(), "sound": self.cfg.alarms.sound})

    async def _subscribe(self, st: StationEntry) -> None:
        try:
            sock = _socket(self.ctx, st)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            log.error("station %s: cannot subscribe to %s: %s", st.name, st.endpoint, exc)
            return
        except Exception:
            log.exception("station %s: subscriber failed to start", st.name)
            raise
        # Batches, not one wake-up per message: a station's messages wait in its socket (RCVHWM) for at most
        # BATCH_S, then all of them are taken with plain non-blocking reads of the same socket. An event-loop
        # wake-up with its asyncio Future costs more than handling a message; at 30 verdicts/s per camera
        # this is a few wake-ups per batch of many messages. A quiet station costs nothing (it waits in recv).
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        pause = min(BATCH_S, self.cfg.server.coalesce_ms / 8000.0)  # a verdict waits at most 1/8 of a push
        try:
            while True:
                self._parts(st, await sock.recv_multipart())
                for _ in range(DRAIN):
                    try:
                        parts = raw.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._parts(st, parts)
                await asyncio.sleep(pause)
        finally:
            sock.close(0)

    def _parts(self, st: StationEntry, parts: list[bytes]) -> None:
        if len(parts) != 2:
            self._reject(st.name, f"{len(parts)}-part message")
            return
        try:
            self.handle(st, parts[0], parts[1])
        except Exception as exc:  # noqa: BLE001 - one message must never end the station's stream
            log.exception("station %s: message not handled", st.name)
            self._reject(st.name, f"{type(exc).__name__}")

    def _stored(self, rows: list[dict[str, Any]], refused: list[dict[str, Any]]) -> None:
        self.recorded += len(rows) - len(refused)
        self.dead_letters += len(refused)
        for r in refused:
            self.metrics.dead_letters.labels(str(r.get("station"))).inc()
        if refused:
            log.error("store refused %d verdict rows (kept in the dead_letters table)", len(refused))

    def _flush(self) -> None:
        """Synchronous final flush (shutdown)."""
        rows, self.pending = self.pending, []
        if rows:
            self._stored(rows, self.store.insert(rows))

    async def _flush_async(self) -> None:
        rows, self.pending = self.pending, []  # swapped on the loop thread: no row is appended concurrently
        if not rows:
            return
        try:
            refused = await asyncio.to_thread(self.store.insert, rows)
        except StoreUnavailable as exc:
            done = rows[: len(rows) - len(exc.remaining)]
            self.recorded += len(done)
            self.pending = exc.remaining[-MAX_PENDING:] + self.pending  # retried next interval (bounded memory)
            raise
        self._stored(rows, refused)

    async def _writer(self) -> None:
        next_prune = time.monotonic() + 5.0
        interval = self.cfg.store.flush_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            try:
                await self._flush_async()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    n = await asyncio.to_thread(self.store.prune)
                    if n:
                        log.info("retention: deleted %d verdicts", n)
            except Exception as exc:  # a store outage must not kill the live view; rows are retried
                log.error("store write failed: %s", str(exc)[:500])

    def subscribe_client(self, token: str | None = None) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=8)
        self.clients[q] = token
        return q

    def close_clients(self, token: str | None = None, code: int = 1001) -> None:
        """Tell WebSocket handlers to close with ``code``: all of them (shutdown), or one session's (logout)."""
        for q, owner in list(self.clients.items()):
            if token is not None and owner != token:
                continue
            while not q.empty():
                q.get_nowait()
            q.put_nowait(code)

    def unsubscribe_client(self, q: asyncio.Queue) -> None:
        self.clients.pop(q, None)

    async def _broadcaster(self) -> None:
        interval = self.cfg.server.coalesce_ms / 1000.0
        last_sent = time.monotonic()
        alarm_version = -1
        while True:
            await asyncio.sleep(interval)
            self._alarm("tick")
            if self.alarms is not None and self.alarms.version != alarm_version:
                alarm_version = self.alarms.version
                text = self.alarm_message()
                for q in list(self.clients):
                    if not q.full():
                        q.put_nowait(text)
            delta = self.live.delta()
            if delta is None:
                if time.monotonic() - last_sent >= KEEPALIVE_S:  # a quiet feed is not a lost feed
                    last_sent = time.monotonic()
                    for q in list(self.clients):
                        if not q.full():
                            q.put_nowait(TICK)
                continue
            last_sent = time.monotonic()
            text, full = dumps(delta), None  # serialised once for every browser
            for q in list(self.clients):
                if q.full():  # a browser that cannot keep up gets one full state instead of a backlog
                    while not q.empty():
                        q.get_nowait()
                    full = full or dumps(self.live.full())
                    q.put_nowait(full)
                else:
                    q.put_nowait(text)
