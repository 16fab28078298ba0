"""The live state the page shows: one tile per station/camera, station heartbeats, recent events.

Fed by the stream subscribers (one asyncio task each); read by the broadcaster, which every
``coalesce_ms`` sends each browser only the tiles that changed since the last push, so a
30 fps camera costs a browser at most 1000 / coalesce_ms tile updates per second.

Browsers get a projection of each message: only the fields the page shows (VIEW_MODEL_KEYS of a
heartbeat's model, at most VIEW_CLASSES class names and VIEW_BOXES boxes of a verdict), so a
station cannot make the console re-send large objects to every browser. ``dumps`` is the one
serialiser for browsers: standard JSON only (a non-finite number becomes null).

Never stale: each tile carries ``status`` ("live" or "no_signal"), the ``reason`` when it is not
live (daemon down / stopping / starting, model reloading, camera down and why) and ``age_s``, the
seconds since its last verdict reached the console at the time of the push; the page adds its
own elapsed time and shows STALE past ``server.stale_after_s``. A camera a heartbeat no longer
lists is removed (``removed`` in the delta). Reasons are texts.Text: ``reason`` is the English text,
``reason_key`` / ``reason_args`` what the page translates (static/i18n.js).

Cheap per verdict: a verdict is kept as it came (``Tile.msg``) and projected for browsers only when a
push or an event needs it (at 30 fps and a 250 ms push, most verdicts are never shown).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deploy.console.config import ConsoleConfig
from deploy.console.texts import Text

DEFECT_WINDOW_S = 60.0
MAX_CAMERAS = 64  # tiles per station: a forged heartbeat listing 10**6 cameras must not exhaust memory
VIEW_MODEL_KEYS = ("name", "version")  # what the tile header shows of a station's model
VIEW_CLASSES = 64  # class names offered in the review dialog
VIEW_BOXES = 100  # boxes drawn on a tile
VIEW_TEXT = 128  # characters of any string shown


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """JSON a browser can parse: never NaN / Infinity (those become null)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_clean(value), separators=(",", ":"), allow_nan=False)


def _text(value: Any) -> str | None:
    return value[:VIEW_TEXT] if isinstance(value, str) else None


def model_view(model: Any) -> dict[str, str | None] | None:
    return {k: _text(model.get(k)) for k in VIEW_MODEL_KEYS} if isinstance(model, Mapping) else None


def _box_view(d: Any) -> dict[str, Any]:
    return {"box": d.get("box"), "score": d.get("score"), "class": _text(d.get("class"))}


def reason_fields(reason: Text | None) -> dict[str, Any]:
    """``reason`` (English, for any reader) and ``reason_key`` / ``reason_args`` (for the page to translate)."""
    if reason is None:
        return {"reason": None, "reason_key": None, "reason_args": None}
    view = reason.view()
    return {"reason": reason.render(), "reason_key": view["key"], "reason_args": view["args"]}


NO_FRAME_YET = Text("reason.camera_no_frame_yet")


@dataclass
class Tile:
    station: str
    camera: str
    msg: Mapping[str, Any] | None = None  # the last verdict as it came; projected by ``last``
    uid: str = ""
    view_of: tuple[Mapping[str, Any] | None, dict[str, Any] | None] = (None, None)  # (msg, its projection)
    defects: deque[float] = field(default_factory=deque)  # monotonic times of defects, last minute
    count: int = 0
    preview: bytes | None = None
    preview_seq: int = 0
    up: bool | None = None  # from the station heartbeat
    cam_reason: Text | None = None  # why the heartbeat says the camera is down
    last_at: float | None = None  # monotonic time the last verdict arrived

    @property
    def last(self) -> dict[str, Any] | None:
        """The browsers' projection of the last verdict (made once per verdict shown, not per verdict)."""
        msg, view = self.view_of
        if msg is not self.msg:
            try:
                view = None if self.msg is None else verdict_view(self.msg, self.uid)
            except (KeyError, TypeError, AttributeError, ValueError):  # validated messages do not; never the push
                view = None
            self.view_of = (self.msg, view)
        return view

    def view(self, now: float, station_reason: Text | None) -> dict[str, Any]:
        while self.defects and now - self.defects[0] > DEFECT_WINDOW_S:
            self.defects.popleft()
        cam_up = self.up if self.up is not None else self.msg is not None
        reason = station_reason or (None if cam_up else (self.cam_reason or NO_FRAME_YET))
        return {
            "id": f"{self.station}/{self.camera}",
            "station": self.station,
            "camera": self.camera,
            "last": self.last,
            "count": self.count,
            "defects_per_min": len(self.defects),
            "preview_seq": self.preview_seq if self.preview is not None else None,
            "up": reason is None,
            "status": "live" if reason is None else "no_signal",
            **reason_fields(reason),
            "age_s": None if self.last_at is None else round(max(0.0, now - self.last_at), 3),
        }


def camera_reason(info: Mapping[str, Any]) -> Text | None:
    """Why a heartbeat's camera entry is down (None when up): finished source, no frame yet or for how long."""
    if info.get("up"):
        return None
    age = info.get("last_frame_age_s")
    errors = info.get("decode_errors")
    unreadable = None
    if isinstance(errors, int) and not isinstance(errors, bool) and errors > 0:
        unreadable = Text("reason.unreadable_frames", n=min(errors, 10**12))
    if info.get("finished") is True:
        return Text("reason.camera_ended", errors=unreadable)
    if isinstance(age, (int, float)) and not isinstance(age, bool) and math.isfinite(age):
        return Text("reason.camera_no_frame_for", s=round(min(age, 1e9)), errors=unreadable)
    return Text("reason.camera_no_frame_yet", errors=unreadable)


NO_HEARTBEAT_YET = Text("reason.no_heartbeat_yet")
RELOADING = Text("reason.reloading")
DAEMON_STATES = {  # a station's state other than serving -> why its tiles show no signal
    "reloading": RELOADING,
    "starting": Text("reason.daemon_starting"),
    "stopping": Text("reason.daemon_stopping"),
    "stopped": Text("reason.daemon_stopped"),
}
DAEMON_DOWN = {"reason.no_heartbeat_yet", "reason.no_heartbeat_for", "reason.daemon_stopping", "reason.daemon_stopped"}


@dataclass
class StationState:
    name: str
    last_status: float | None = None  # monotonic
    state: str = "unknown"
    model: dict[str, Any] | None = None


def verdict_view(msg: Mapping[str, Any], uid: str) -> dict[str, Any]:
    """The part of a verdict message a browser needs."""
    snap = msg.get("snapshot")
    return {
        "uid": uid,
        "station": msg["station"],
        "camera": msg["camera"],
        "seq": msg["seq"],
        "verdict": msg["verdict"],
        "top_class": msg["top_class"],
        "defect_class": msg.get("defect_class"),
        "confidence": msg["confidence"],
        "captured_at": msg["captured_at"],
        "task": msg["task"],
        "model_version": _text((msg.get("model") or {}).get("version")),
        "classes": sorted(str(c)[:VIEW_TEXT] for c in (msg.get("probabilities") or msg.get("class_scores") or {}))[
            :VIEW_CLASSES
        ],
        "boxes": (
            [_box_view(d) for d in msg["detections"][:VIEW_BOXES] if isinstance(d, Mapping)]
            if isinstance(msg.get("detections"), list)
            else None
        ),
        "snapshot": snap.rsplit("/", 1)[-1] if isinstance(snap, str) and snap else None,
    }


class Live:
    def __init__(self, cfg: ConsoleConfig) -> None:
        self.cfg = cfg
        self.tiles: dict[str, Tile] = {}
        self.stations = {s.name: StationState(s.name) for s in cfg.stations}
        self.events: deque[dict[str, Any]] = deque(maxlen=cfg.server.events)
        self.dirty: set[str] = set()
        self.new_events: list[dict[str, Any]] = []
        self._up: dict[str, Text | None] = {}  # station -> its reason of the last push (None = up)
        self.removed: set[str] = set()
        self.received = {"verdict": 0, "status": 0, "preview": 0, "rejected": 0}

    def accepts(self, msg: Mapping[str, Any]) -> bool:
        """False when ``msg`` would take a station past MAX_CAMERAS tiles."""
        station = msg["station"]
        if msg["type"] == "verdict" and f"{station}/{msg['camera']}" in self.tiles:
            return True  # a known tile (nearly every message): no count of the station's tiles
        cams = [msg["camera"]] if msg["type"] == "verdict" else list(msg["cameras"])
        have = {t.camera for t in self.tiles.values() if t.station == station}
        return len(have | set(cams)) <= MAX_CAMERAS

    def _tile(self, station: str, camera: str) -> Tile:
        key = f"{station}/{camera}"
        tile = self.tiles.get(key)
        if tile is None:
            tile = self.tiles[key] = Tile(station, camera)
        return tile

    def on_verdict(self, msg: Mapping[str, Any], uid: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        tile = self._tile(msg["station"], msg["camera"])
        tile.msg, tile.uid = msg, uid
        tile.last_at = now
        tile.count += 1
        verdict = msg["verdict"]
        if verdict == "defect":
            tile.defects.append(now)
        if verdict == "defect" or verdict == "uncertain":
            view = tile.last  # events are few: projected now, and shared with the tile
            if view is not None:
                self.events.appendleft(view)
                self.new_events.append(view)
        self.dirty.add(f"{tile.station}/{tile.camera}")
        self.received["verdict"] += 1

    def on_status(self, msg: Mapping[str, Any], now: float | None = None) -> None:
        st = self.stations.get(msg["station"])
        if st is None:
            return
        st.last_status = time.monotonic() if now is None else now
        if st.state != msg["state"]:  # reloading / stopping: every tile of the station says so
            self.dirty.update(k for k, t in self.tiles.items() if t.station == st.name)
        st.state = msg["state"]
        st.model = model_view(msg.get("model"))
        for cam, info in msg["cameras"].items():
            tile = self._tile(st.name, cam)
            reason = camera_reason(info)
            if tile.up != info["up"] or tile.cam_reason != reason:
                tile.up = bool(info["up"])
                tile.cam_reason = reason
                self.dirty.add(f"{st.name}/{cam}")
        for key in [k for k, t in self.tiles.items() if t.station == st.name and t.camera not in msg["cameras"]]:
            del self.tiles[key]  # the station no longer has this camera
            self.dirty.discard(key)
            self.removed.add(key)
        self.received["status"] += 1

    def on_preview(self, station: str, camera: str, jpeg: bytes) -> None:
        tile = self._tile(station, camera)
        tile.preview = jpeg
        tile.preview_seq += 1
        self.dirty.add(f"{station}/{camera}")
        self.received["preview"] += 1

    def station_reason(self, name: str, now: float) -> Text | None:
        """Why the station's tiles show no signal (None: serving and heard from recently)."""
        st = self.stations.get(name)
        if st is None or st.last_status is None:
            return NO_HEARTBEAT_YET
        if now - st.last_status > self.cfg.server.down_after_s:
            return Text("reason.no_heartbeat_for", s=self.cfg.server.down_after_s)
        if st.state == "serving":
            return None
        return DAEMON_STATES.get(st.state) or Text("reason.daemon_state", state=st.state)

    def station_up(self, name: str, now: float) -> bool:
        reason = self.station_reason(name, now)
        return reason is None or reason is RELOADING

    def _station_views(self, now: float) -> list[dict[str, Any]]:
        views = []
        for s in self.stations.values():
            reason = self.station_reason(s.name, now)
            views.append(
                {
                    "name": s.name,
                    "up": reason is None or reason is RELOADING,
                    "state": s.state,
                    **reason_fields(reason),
                    "model": s.model,
                }
            )
        return views

    def full(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {
            "type": "full",
            "stations": self._station_views(now),
            "tiles": [t.view(now, self.station_reason(t.station, now)) for t in self.tiles.values()],
            "events": list(self.events),
            "stale_after_s": self.cfg.server.stale_after_s,
        }

    def delta(self, now: float | None = None) -> dict[str, Any] | None:
        """Changes since the last call (None when nothing changed): the broadcaster's one message."""
        now = time.monotonic() if now is None else now
        up = {s: self.station_reason(s, now) for s in self.stations}
        flipped = {s for s, u in up.items() if s not in self._up or self._up[s] != u}
        self._up = up
        for key, tile in self.tiles.items():
            if tile.station in flipped or (tile.defects and now - tile.defects[0] > DEFECT_WINDOW_S):
                self.dirty.add(key)
        if not self.dirty and not self.new_events and not flipped and not self.removed:
            return None
        tiles = [self.tiles[k].view(now, up.get(self.tiles[k].station)) for k in sorted(self.dirty) if k in self.tiles]
        msg = {
            "type": "delta",
            "stations": self._station_views(now),
            "tiles": tiles,
            "events": self.new_events[-self.cfg.server.events :],
            "removed": sorted(self.removed),
        }
        self.dirty = set()
        self.new_events = []
        self.removed = set()
        return msg
