"""The live state the page shows: one tile per station/camera, station heartbeats, recent events.

Fed by the stream subscribers (one asyncio task each); read by the broadcaster, which every
``coalesce_ms`` sends each browser only the tiles that changed since the last push, so a
30 fps camera costs a browser at most 1000 / coalesce_ms tile updates per second.

Browsers get a projection of each message: only the fields the page shows (VIEW_MODEL_KEYS of a
heartbeat's model, at most VIEW_CLASSES class names and VIEW_BOXES boxes of a verdict), so a
station cannot make the console re-send large objects to every browser. ``dumps`` is the one
serialiser for browsers: standard JSON only (a non-finite number becomes null).
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


@dataclass
class Tile:
    station: str
    camera: str
    last: dict[str, Any] | None = None
    defects: deque[float] = field(default_factory=deque)  # monotonic times of defects, last minute
    count: int = 0
    preview: bytes | None = None
    preview_seq: int = 0
    up: bool | None = None  # from the station heartbeat

    def view(self, now: float, station_up: bool) -> dict[str, Any]:
        while self.defects and now - self.defects[0] > DEFECT_WINDOW_S:
            self.defects.popleft()
        return {"id": f"{self.station}/{self.camera}", "station": self.station, "camera": self.camera,
                "last": self.last, "count": self.count, "defects_per_min": len(self.defects),
                "preview_seq": self.preview_seq if self.preview is not None else None,
                "up": bool(station_up and (self.up if self.up is not None else self.last is not None))}


@dataclass
class StationState:
    name: str
    last_status: float | None = None  # monotonic
    state: str = "unknown"
    model: dict[str, Any] | None = None


def verdict_view(msg: Mapping[str, Any], uid: str) -> dict[str, Any]:
    """The part of a verdict message a browser needs."""
    snap = msg.get("snapshot")
    return {"uid": uid, "station": msg["station"], "camera": msg["camera"], "seq": msg["seq"],
            "verdict": msg["verdict"], "top_class": msg["top_class"], "defect_class": msg.get("defect_class"),
            "confidence": msg["confidence"], "captured_at": msg["captured_at"], "task": msg["task"],
            "model_version": _text((msg.get("model") or {}).get("version")),
            "classes": sorted(str(c)[:VIEW_TEXT] for c in (msg.get("probabilities") or msg.get("class_scores") or {}))[
                :VIEW_CLASSES],
            "boxes": ([_box_view(d) for d in msg["detections"][:VIEW_BOXES] if isinstance(d, Mapping)]
                      if isinstance(msg.get("detections"), list) else None),
            "snapshot": snap.rsplit("/", 1)[-1] if isinstance(snap, str) and snap else None}


class Live:
    def __init__(self, cfg: ConsoleConfig) -> None:
        self.cfg = cfg
        self.tiles: dict[str, Tile] = {}
        self.stations = {s.name: StationState(s.name) for s in cfg.stations}
        self.events: deque[dict[str, Any]] = deque(maxlen=cfg.server.events)
        self.dirty: set[str] = set()
        self.new_events: list[dict[str, Any]] = []
        self._up: dict[str, bool] = {}
        self.received = {"verdict": 0, "status": 0, "preview": 0, "rejected": 0}

    def accepts(self, msg: Mapping[str, Any]) -> bool:
        """False when ``msg`` would take a station past MAX_CAMERAS tiles."""
        station = msg["station"]
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
        view = verdict_view(msg, uid)
        tile.last = view
        tile.count += 1
        if msg["verdict"] == "defect":
            tile.defects.append(now)
        if msg["verdict"] in ("defect", "uncertain"):
            self.events.appendleft(view)
            self.new_events.append(view)
        self.dirty.add(f"{tile.station}/{tile.camera}")
        self.received["verdict"] += 1

    def on_status(self, msg: Mapping[str, Any], now: float | None = None) -> None:
        st = self.stations.get(msg["station"])
        if st is None:
            return
        st.last_status = time.monotonic() if now is None else now
        st.state = msg["state"]
        st.model = model_view(msg.get("model"))
        for cam, info in msg["cameras"].items():
            tile = self._tile(st.name, cam)
            if tile.up != info["up"]:
                tile.up = bool(info["up"])
                self.dirty.add(f"{st.name}/{cam}")
        self.received["status"] += 1

    def on_preview(self, station: str, camera: str, jpeg: bytes) -> None:
        tile = self._tile(station, camera)
        tile.preview = jpeg
        tile.preview_seq += 1
        self.dirty.add(f"{station}/{camera}")
        self.received["preview"] += 1

    def station_up(self, name: str, now: float) -> bool:
        st = self.stations.get(name)
        return bool(st and st.last_status is not None and now - st.last_status <= self.cfg.server.down_after_s
                    and st.state not in ("stopping", "stopped"))

    def _station_views(self, now: float) -> list[dict[str, Any]]:
        return [{"name": s.name, "up": self.station_up(s.name, now), "state": s.state,
                 "model": s.model} for s in self.stations.values()]

    def full(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {"type": "full", "stations": self._station_views(now),
                "tiles": [t.view(now, self.station_up(t.station, now)) for t in self.tiles.values()],
                "events": list(self.events)}

    def delta(self, now: float | None = None) -> dict[str, Any] | None:
        """Changes since the last call (None when nothing changed): the broadcaster's one message."""
        now = time.monotonic() if now is None else now
        up = {s: self.station_up(s, now) for s in self.stations}
        flipped = {s for s, u in up.items() if self._up.get(s) != u}
        self._up = up
        for key, tile in self.tiles.items():
            if tile.station in flipped or (tile.defects and now - tile.defects[0] > DEFECT_WINDOW_S):
                self.dirty.add(key)
        if not self.dirty and not self.new_events and not flipped:
            return None
        tiles = [self.tiles[k].view(now, up.get(self.tiles[k].station, False)) for k in sorted(self.dirty)]
        msg = {"type": "delta", "stations": self._station_views(now), "tiles": tiles,
               "events": self.new_events[-self.cfg.server.events:]}
        self.dirty = set()
        self.new_events = []
        return msg
