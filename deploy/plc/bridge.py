"""The PLC bridge: per-part rejects from the stations' ZeroMQ streams, alarms from the console's webhook.

Rejects do not wait on the console: each ``[[rejects]]`` entry subscribes to its camera's verdict
topic (``<station>.<camera>.``) and, per matching verdict, raises its pulse output for ``pulse_ms``
(a reject during a pulse extends it) and bumps its counter. Alarms: the console POSTs its whole
alarm state (deploy/console/webhook.py) on every change and every ``webhook_repeat_s``; the bridge
checks the HMAC signature and writes ``alarm_active`` / ``alarm_unacknowledged``. ``console_ok``
is true while posts arrive within ``console_lost_after_s``. Level outputs and counters are
re-written every second; on shutdown ``console_ok`` is written false.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

import zmq
import zmq.asyncio

from deploy.console.webhook import read_secret, sign
from deploy.plc.config import Address, PlcConfig, Reject
from deploy.plc.writers import ModbusWriter, OpcUaWriter, WriteFailed, Writer
from runtime.serving.curve_keys import client_keys
from runtime.serving.messages import MAX_MESSAGE_BYTES, SchemaError, decode, validate

log = logging.getLogger("defectscope.plc")
MAX_BODY = 1024 * 1024  # the console's alarm state; larger posts are refused
LEVEL_EVERY_S = 1.0


class Bridge:
    def __init__(self, cfg: PlcConfig, writer: Writer | None = None) -> None:
        self.cfg = cfg
        self.writer: Writer = writer or (ModbusWriter(cfg.modbus) if cfg.modbus else OpcUaWriter(cfg.opcua))  # type: ignore[arg-type]
        self.secret = read_secret(cfg.listen.secret_file)
        self.lock = asyncio.Lock()
        self.alarm_active = False
        self.alarm_unacked = False
        self.last_post: float | None = None  # monotonic
        self.counts = [0] * len(cfg.rejects)
        self.pulse_off: dict[int, asyncio.Task[None]] = {}
        self.write_errors = 0
        self.posts = {"accepted": 0, "refused": 0}
        self.received = 0  # verdict messages heard on the reject topics (any verdict)

    # -- outputs -------------------------------------------------------------------------------
    async def _write(self, kind: str, address: Address | None, value: Any) -> None:
        if address is None:
            return
        async with self.lock:
            try:
                if kind == "bool":
                    await self.writer.write_bool(address, value)
                else:
                    await self.writer.write_int(address, value)
            except WriteFailed as exc:
                self.write_errors += 1
                log.warning("%s", exc)

    def console_ok(self) -> bool:
        return self.last_post is not None and time.monotonic() - self.last_post <= self.cfg.listen.console_lost_after_s

    async def write_levels(self) -> None:
        out = self.cfg.outputs
        await self._write("bool", out.alarm_active, self.alarm_active)
        await self._write("bool", out.alarm_unacknowledged, self.alarm_unacked)
        await self._write("bool", out.console_ok, self.console_ok())
        for i, r in enumerate(self.cfg.rejects):
            await self._write("int", r.count, self.counts[i])

    async def levels(self) -> None:
        while True:
            await self.write_levels()
            await asyncio.sleep(LEVEL_EVERY_S)

    # -- alarms (webhook) ----------------------------------------------------------------------
    def accept_post(self, body: bytes, signature: str | None) -> str | None:
        """Apply a console post; returns why it was refused, or None."""
        if len(body) > MAX_BODY:
            return "body too large"
        if self.secret is not None and not (signature and hmac.compare_digest(signature, sign(self.secret, body))):
            return "bad or missing signature"
        try:
            msg = json.loads(body)
            active, unacked = msg["active"], msg["unacknowledged"]
        except (ValueError, KeyError, TypeError):
            return "not an alarm state (expected JSON with active, unacknowledged)"
        if not isinstance(active, bool) or not isinstance(unacked, bool):
            return "active / unacknowledged: expected true or false"
        self.alarm_active, self.alarm_unacked = active, unacked
        self.last_post = time.monotonic()
        return None

    # -- rejects (ZeroMQ) ----------------------------------------------------------------------
    async def on_verdict(self, index: int, reject: Reject, msg: dict[str, Any]) -> None:
        if msg.get("verdict") not in reject.verdicts:
            return
        self.counts[index] += 1
        if reject.pulse is not None:
            old = self.pulse_off.pop(index, None)
            if old is not None:
                old.cancel()  # a reject during a pulse extends it
            else:
                await self._write("bool", reject.pulse, True)
            self.pulse_off[index] = asyncio.create_task(self._pulse_end(index, reject))
        await self._write("int", reject.count, self.counts[index])

    async def _pulse_end(self, index: int, reject: Reject) -> None:
        await asyncio.sleep(reject.pulse_ms / 1000.0)
        self.pulse_off.pop(index, None)
        await self._write("bool", reject.pulse, False)

    async def subscribe(self, ctx: zmq.asyncio.Context) -> None:
        socks = []
        by_station: dict[str, list[int]] = {}
        for i, r in enumerate(self.cfg.rejects):
            by_station.setdefault(r.station, []).append(i)
        poller = zmq.asyncio.Poller()
        for st in self.cfg.stations:
            if st.name not in by_station:
                continue
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_MESSAGE_BYTES)
            if st.curve is not None:
                client_keys(st.curve.server_public_key, st.curve.client_secret_key, f"stations.{st.name}.curve").apply(
                    s
                )
            for i in by_station[st.name]:
                s.setsockopt_string(zmq.SUBSCRIBE, f"{st.name}.{self.cfg.rejects[i].camera}.")
            s.connect(st.endpoint)
            poller.register(s, zmq.POLLIN)
            socks.append((s, st.name))
        try:
            while socks:
                for sock, _event in await poller.poll():
                    topic, payload = (await sock.recv_multipart())[:2]
                    await self._handle(by_station, sock, socks, topic, payload)
        finally:
            for s, _ in socks:
                s.close()

    async def _handle(
        self, by_station: dict[str, list[int]], sock: Any, socks: list[Any], topic: bytes, payload: bytes
    ) -> None:
        station = next(name for s, name in socks if s is sock)
        try:
            msg = decode(payload, MAX_MESSAGE_BYTES)
            validate(msg)
        except (SchemaError, ValueError, TypeError, KeyError, RecursionError) as exc:
            log.warning("station %s: message refused: %s", station, str(exc)[:200])
            return
        if msg.get("type") != "verdict" or msg.get("station") != station:
            return
        self.received += 1
        for i in by_station[station]:
            if self.cfg.rejects[i].camera == msg["camera"]:
                await self.on_verdict(i, self.cfg.rejects[i], msg)

    def health(self) -> dict[str, Any]:
        return {
            "alarm_active": self.alarm_active,
            "alarm_unacknowledged": self.alarm_unacked,
            "console_ok": self.console_ok(),
            "rejects": list(self.counts),
            "write_errors": self.write_errors,
            "received": self.received,
            "posts": dict(self.posts),
        }
