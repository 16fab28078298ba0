"""Alarm rules evaluated on the live streams; each alarm is stored with who acknowledged it and when.

An alarm is keyed by (rule, station, camera). It is raised once (a row in ``alarms``), shown until it
is both cleared (its condition ended) and acknowledged; a condition that comes back before the
acknowledge re-activates the same alarm instead of adding rows, so a flapping rule costs at most
one row per acknowledge. Rates use one-second buckets with running sums per camera and window
(O(1) per verdict). After a restart, unacknowledged alarms are loaded again (marked cleared at
the restart; a condition still true re-activates them).

Every change calls ``on_change`` (the webhook / PLC output and the browsers); times are unix seconds.
An alarm's ``message`` is English (history, webhook, PLC bridge, logs); ``message_key`` and
``message_args`` are the same text for the page to translate (texts.Text, static/i18n.js). Messages are
composed only when an alarm changes, not per verdict; the rules that apply to a camera are looked up
once per camera.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa

from deploy.console.alarm_rules import AlarmConfig, Rule
from deploy.console.live import DAEMON_DOWN, Live
from deploy.console.store import alarms as table
from deploy.console.texts import Text

CAMERA_DOWN = Text("reason.camera_down")

Key = tuple[str, str, str | None]


@dataclass
class Alarm:
    id: int
    rule: str
    kind: str
    station: str
    camera: str | None
    message: str
    raised_at: float
    active: bool = True
    cleared_at: float | None = None
    acked_by: str | None = None
    acked_at: float | None = None
    message_key: str | None = None  # None: a row from before texts had keys (the page shows ``message``)
    message_args: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        """A plain dict (shallow: ``message_args`` is replaced, never changed, so readers may share it)."""
        return {name: getattr(self, name) for name in FIELDS}


FIELDS = tuple(f.name for f in fields(Alarm))


def _message(text: Text) -> dict[str, Any]:
    """The columns of a message: English text, key and arguments (JSON)."""
    view = text.view()
    return {"message": text.render(), "message_key": view["key"], "message_args": json.dumps(view["args"])}


def _args(raw: Any) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Window:
    """Verdict counts of one camera over the last ``window_s`` seconds, in one-second buckets."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.buckets: deque[list[int]] = deque()  # [second, total, defect, uncertain]
        self.total = self.defect = self.uncertain = 0

    def add(self, t: float, verdict: str) -> None:
        sec = int(t)
        if not self.buckets or self.buckets[-1][0] != sec:
            self.buckets.append([sec, 0, 0, 0])
        b = self.buckets[-1]
        d, u = int(verdict == "defect"), int(verdict == "uncertain")
        b[1] += 1
        b[2] += d
        b[3] += u
        self.total += 1
        self.defect += d
        self.uncertain += u
        self.expire(t)

    def expire(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] <= now - self.window_s:
            _, n, d, u = self.buckets.popleft()
            self.total -= n
            self.defect -= d
            self.uncertain -= u


def _cam(cam: tuple[str, str]) -> dict[str, str]:
    return {"station": cam[0], "camera": cam[1]}


class Alarms:
    def __init__(
        self,
        cfg: AlarmConfig,
        engine: sa.Engine,
        live: Live,
        on_change: Callable[[str, Alarm | None], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.live = live
        self.on_change = on_change
        self.open: dict[Key, Alarm] = {}
        self.windows: dict[tuple[str, str, float], Window] = {}
        self.in_row: dict[tuple[str, str], int] = {}
        self.down_since: dict[Key, float] = {}
        self._rules: dict[tuple[str, str], tuple[list[Rule], list[float]]] = {}  # camera -> its rules, windows
        self.version = 0
        self._load()

    # -- inputs --------------------------------------------------------------------------------
    def on_verdict(self, msg: Mapping[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        station, camera, verdict = msg["station"], msg["camera"], msg["verdict"]
        cam = (station, camera)
        row = self.in_row[cam] = self.in_row.get(cam, 0) + 1 if verdict == "defect" else 0
        got = self._rules.get(cam)
        if got is None:
            rules = [r for r in self.cfg.rules if r.matches(station, camera)]
            windows = sorted({r.window_s for r in rules if r.kind in ("defect_rate", "uncertain_rate")})
            got = self._rules[cam] = (rules, windows)
        rules, windows = got
        for window_s in windows:
            w = self.windows.get((station, camera, window_s))
            if w is None:
                w = self.windows[(station, camera, window_s)] = Window(window_s)
            w.add(now, verdict)  # once per window, however many rules share it
        for rule in rules:
            if rule.kind == "defects_in_row":
                on = row >= rule.count
                if self._changes(rule, station, camera, on):
                    self._set(rule, station, camera, on, Text("alarm.defects_in_row", **_cam(cam), n=row), now)
            elif rule.kind in ("defect_rate", "uncertain_rate"):
                w = self.windows[(station, camera, rule.window_s)]
                frac = (w.defect if rule.kind == "defect_rate" else w.uncertain) / w.total
                on = w.total >= rule.min_frames and frac >= rule.threshold
                if self._changes(rule, station, camera, on):
                    text = Text(
                        "alarm.defect_rate" if rule.kind == "defect_rate" else "alarm.uncertain_rate",
                        **_cam(cam),
                        rate=round(100 * frac),
                        window=rule.window_s,
                        threshold=round(100 * rule.threshold),
                    )
                    self._set(rule, station, camera, on, text, now)

    def _changes(self, rule: Rule, station: str, camera: str | None, on: bool) -> bool:
        """Whether setting the rule's condition to ``on`` changes its alarm (most verdicts change nothing)."""
        a = self.open.get((rule.name, station, camera))
        return on != (a is not None and a.active)

    def on_status(self, msg: Mapping[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        station = msg["station"]
        model = msg.get("model") if isinstance(msg.get("model"), Mapping) else {}
        reload = msg.get("last_reload") if isinstance(msg.get("last_reload"), Mapping) else {}
        why = None  # the station's own words are arguments: cut and cleaned by Text, shown as text
        if isinstance(model, Mapping) and model.get("boot_fallback"):
            why = Text("alarm.model_fallback", station=station, detail=str(model["boot_fallback"]))
        elif isinstance(reload, Mapping) and reload.get("result") == "failed":
            why = Text("alarm.model_refused", station=station, detail=str(reload.get("error")))
        for rule in self.cfg.rules:
            if rule.kind == "model_fallback" and rule.matches(station):
                self._set(rule, station, None, why is not None, why, now)

    def tick(self, now: float | None = None, mono: float | None = None) -> None:
        """Timed rules: camera and station down for ``for_s``."""
        now = time.time() if now is None else now
        mono = time.monotonic() if mono is None else mono
        for rule in self.cfg.rules:
            if rule.kind == "station_down":
                for name in self.live.stations:
                    if rule.matches(name):
                        reason = self.live.station_reason(name, mono)
                        down = reason is not None and reason.key in DAEMON_DOWN
                        text = Text("alarm.station_down", station=name, reason=reason) if down else None
                        self._timed(rule, name, None, text, now)
            elif rule.kind == "camera_down":
                for tile in list(self.live.tiles.values()):
                    if rule.matches(tile.station, tile.camera):
                        down = self.live.station_up(tile.station, mono) and tile.up is False
                        text = None  # composed only while down (rare), not every tick for every tile
                        if down:
                            reason = tile.cam_reason or CAMERA_DOWN
                            text = Text("alarm.camera_down", station=tile.station, camera=tile.camera, reason=reason)
                        self._timed(rule, tile.station, tile.camera, text, now)

    def _timed(self, rule: Rule, station: str, camera: str | None, message: Text | None, now: float) -> None:
        """``message``: why it is down (None: it is up)."""
        key = (rule.name, station, camera)
        if message is None:
            self.down_since.pop(key, None)
            self._set(rule, station, camera, False, message, now)
            return
        since = self.down_since.setdefault(key, now)
        if now - since >= rule.for_s:
            self._set(rule, station, camera, True, message, now)

    # -- state ---------------------------------------------------------------------------------
    def _set(self, rule: Rule, station: str, camera: str | None, on: bool, message: Text | None, now: float) -> None:
        key = (rule.name, station, camera)
        a = self.open.get(key)
        if on:
            if a is not None and a.active:
                return
            assert message is not None  # a condition that holds says why
            cols = _message(message)
            args = _args(cols["message_args"])
            if a is not None:  # back before anyone acknowledged it: the same alarm again
                a.active, a.cleared_at = True, None
                a.message, a.message_key, a.message_args = cols["message"], cols["message_key"], args
                self._update(a, cleared_at=None, **cols)
                self._changed("raised", a)
                return
            with self.engine.begin() as conn:
                res = conn.execute(
                    table.insert().values(
                        rule=rule.name, kind=rule.kind, station=station, camera=camera, raised_at=now, **cols
                    )
                )
                pk = res.inserted_primary_key
                assert pk is not None  # an INSERT always has one
                new_id = int(pk[0])
            a = self.open[key] = Alarm(
                new_id,
                rule.name,
                rule.kind,
                station,
                camera,
                cols["message"],
                now,
                message_key=cols["message_key"],
                message_args=args,
            )
            self._changed("raised", a)
        elif a is not None and a.active:
            a.active, a.cleared_at = False, now
            self._update(a, cleared_at=now)
            if a.acked_at is not None:
                del self.open[key]
            self._changed("cleared", a)

    def ack(self, alarm_id: int, user: str, now: float | None = None) -> Alarm | None:
        now = time.time() if now is None else now
        for key, a in list(self.open.items()):
            if a.id == alarm_id:
                if a.acked_at is None:
                    a.acked_by, a.acked_at = user, now
                    self._update(a, acked_by=user, acked_at=now)
                    if not a.active:
                        del self.open[key]
                    self._changed("acknowledged", a)
                return a
        return None

    def _update(self, a: Alarm, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(table.update().where(table.c.id == a.id).values(**values))

    def _changed(self, event: str, a: Alarm | None) -> None:
        self.version += 1
        if self.on_change is not None:
            self.on_change(event, a)

    def _load(self) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                table.update().where(table.c.acked_at.is_(None), table.c.cleared_at.is_(None)).values(cleared_at=now)
            )  # re-raised below if the condition still holds
            rows = conn.execute(sa.select(table).where(table.c.acked_at.is_(None)).order_by(table.c.id)).mappings()
            for m in rows:
                a = Alarm(**{k: m[k] for k in Alarm.__dataclass_fields__ if k not in ("active", "message_args")})
                a.active, a.message_args = False, _args(m["message_args"])
                self.open[(a.rule, a.station, a.camera)] = a

    # -- outputs -------------------------------------------------------------------------------
    def views(self) -> list[dict[str, Any]]:
        return [a.view() for a in sorted(self.open.values(), key=lambda a: a.raised_at, reverse=True)]

    def history(self, limit: int = 200) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            q = sa.select(table).order_by(table.c.id.desc()).limit(limit)
            return [dict(m) | {"message_args": _args(m["message_args"])} for m in conn.execute(q).mappings()]

    def search(
        self,
        station: str | None = None,
        camera: str | None = None,
        kind: str | None = None,
        cleared: bool | None = None,
        acked: bool | None = None,
        t0: float | None = None,
        t1: float | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[dict[str, Any]], int]:
        """The alarms page: newest first, filtered (bound parameters only); (one page of rows, matching rows).

        ``cleared``: the condition has ended (False: it still holds); ``acked``: someone acknowledged it;
        ``t0`` / ``t1``: ``raised_at`` in [t0, t1).
        """
        where: list[Any] = []
        if station:
            where.append(table.c.station == station)
        if camera:
            where.append(table.c.camera == camera)
        if kind:
            where.append(table.c.kind == kind)
        if cleared is not None:
            where.append(table.c.cleared_at.is_not(None) if cleared else table.c.cleared_at.is_(None))
        if acked is not None:
            where.append(table.c.acked_at.is_not(None) if acked else table.c.acked_at.is_(None))
        if t0 is not None:
            where.append(table.c.raised_at >= t0)
        if t1 is not None:
            where.append(table.c.raised_at < t1)
        q = sa.select(table).where(*where).order_by(table.c.raised_at.desc(), table.c.id.desc())
        q = q.offset(offset).limit(limit)
        n = sa.select(sa.func.count()).select_from(table).where(*where)
        with self.engine.connect() as conn:
            rows = [dict(m) | {"message_args": _args(m["message_args"])} for m in conn.execute(q).mappings()]
            return rows, int(conn.execute(n).scalar_one())
