"""``defectscope watch``: live terminal view of a station's verdict stream for line operators.

Per camera: up/down, the latest verdict with its class and confidence, frames/s
and defects/min (detectors: the latest verdict's boxes per class, and boxes seen per
class); below, the most recent defect / uncertain events. Filters by
camera and verdict. The state model (:class:`ViewerState`) has no terminal in
it, so it is tested directly; ``--once`` / ``--duration`` make the command
itself testable as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.serving.messages import STATUS, VERDICTS, SchemaError, decode, validate

VERDICT_STYLE = {"ok": "green", "defect": "bold red", "uncertain": "yellow"}


@dataclass
class CameraView:
    camera: str
    station: str = ""
    latest: dict[str, Any] | None = None  # last verdict message shown (after filters)
    first_seen: float | None = None  # monotonic time of the first verdict seen (rates need the span)
    last_seen: float | None = None  # monotonic time of the last verdict of this camera (any verdict)
    status_up: bool | None = None  # from the station's status heartbeat
    status_seen: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "defect": 0, "uncertain": 0})
    frame_times: deque = field(default_factory=lambda: deque(maxlen=4096))
    defect_times: deque = field(default_factory=lambda: deque(maxlen=4096))
    box_counts: dict[str, int] = field(default_factory=dict)  # detectors: boxes seen per class


def box_summary(detections: Any) -> str | None:
    """``"2 scratch, 1 stain"`` for a detection verdict's boxes ("0 boxes" when none); None: not a detector."""
    if not isinstance(detections, list):
        return None
    per_class = per_class_counts(detections)
    return ", ".join(f"{n} {c}" for c, n in sorted(per_class.items())) if per_class else "0 boxes"


def per_class_counts(detections: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in detections:
        out[d["class"]] = out.get(d["class"], 0) + 1
    return out


class ViewerState:
    """Everything the view shows, updated message by message; ``now`` is time.monotonic()."""

    def __init__(
        self,
        cameras: Iterable[str] = (),
        verdicts: Iterable[str] = (),
        max_events: int = 15,
        rate_window_s: float = 10.0,
        stale_after_s: float = 5.0,
    ) -> None:
        self.camera_filter = set(cameras)
        self.verdict_filter = set(verdicts)
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.rate_window_s = rate_window_s
        self.stale_after_s = stale_after_s
        self.cameras: dict[str, CameraView] = {}
        self.stations: dict[str, dict[str, Any]] = {}  # station -> last status message
        self.received = 0
        self.invalid = 0
        self.last_error: str | None = None

    def _cam(self, station: str, camera: str) -> CameraView:
        key = f"{station}.{camera}"
        if key not in self.cameras:
            self.cameras[key] = CameraView(camera=camera, station=station)
        return self.cameras[key]

    def update(self, msg: Any, now: float) -> bool:
        """Apply one decoded message; False if it was invalid or filtered out."""
        try:
            validate(msg)
        except SchemaError as exc:
            self.invalid += 1
            self.last_error = str(exc)
            return False
        self.received += 1
        station = msg["station"]
        if msg["type"] == "status":
            self.stations[station] = {**msg, "_seen": now}
            for cam, info in msg["cameras"].items():
                if self.camera_filter and cam not in self.camera_filter:
                    continue
                view = self._cam(station, cam)
                view.status_up = bool(info["up"])
                view.status_seen = now
            return True
        cam = msg["camera"]
        if self.camera_filter and cam not in self.camera_filter:
            return False
        view = self._cam(station, cam)
        if view.first_seen is None:
            view.first_seen = now
        view.last_seen = now
        view.frame_times.append(now)
        verdict = msg["verdict"]
        view.counts[verdict] = view.counts.get(verdict, 0) + 1
        if verdict == "defect":
            view.defect_times.append(now)
        for cls, n in per_class_counts(msg.get("detections") or []).items():
            view.box_counts[cls] = view.box_counts.get(cls, 0) + n
        if self.verdict_filter and verdict not in self.verdict_filter:
            return False
        view.latest = msg
        if verdict in ("defect", "uncertain"):
            self.events.appendleft(
                {
                    "station": station,
                    "camera": cam,
                    "seq": msg["seq"],
                    "verdict": verdict,
                    "class": msg.get("defect_class") or msg["top_class"],
                    "confidence": msg["confidence"],
                    "captured_at": msg["captured_at"],
                    "snapshot": msg.get("snapshot"),
                    "source": msg.get("source"),
                    "boxes": box_summary(msg.get("detections")),
                }
            )
        return True

    def up(self, view: CameraView, now: float) -> bool | None:
        """Camera up per the latest heartbeat, else per verdict recency; None when unknown."""
        if view.status_seen is not None and now - view.status_seen <= self.stale_after_s:
            return view.status_up
        if view.last_seen is not None:
            return now - view.last_seen <= self.stale_after_s
        return None

    def rows(self, now: float) -> list[dict[str, Any]]:
        """One dict per camera: what the table shows (sorted by station, camera)."""
        out = []
        horizon = now - self.rate_window_s
        for key in sorted(self.cameras):
            v = self.cameras[key]
            while v.frame_times and v.frame_times[0] < horizon:
                v.frame_times.popleft()
            while v.defect_times and v.defect_times[0] < horizon:
                v.defect_times.popleft()
            # Rates over the window, or over the time watched so far when that is shorter (>= 1 s).
            window = max(1.0, min(self.rate_window_s, now - (v.first_seen if v.first_seen is not None else now)))
            latest = v.latest or {}
            out.append(
                {
                    "station": v.station,
                    "camera": v.camera,
                    "up": self.up(v, now),
                    "verdict": latest.get("verdict"),
                    "class": latest.get("defect_class") or latest.get("top_class"),
                    "confidence": latest.get("confidence"),
                    "seq": latest.get("seq"),
                    "model": (f"{latest['model']['name']} {latest['model']['version']}" if latest else None),
                    "fps": len(v.frame_times) / window,
                    "defects_per_min": len(v.defect_times) * 60.0 / window,
                    "counts": dict(v.counts),
                    "boxes": box_summary(latest.get("detections")),  # the latest verdict's, per class
                    "box_counts": dict(v.box_counts),  # every verdict's since watching, per class
                    "age_s": None if v.last_seen is None else now - v.last_seen,
                }
            )
        return out


def render(state: ViewerState, now: float, endpoints: Iterable[str] = ()) -> Any:
    """A rich renderable of the state (tables + a footer)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    cams = Table(title="cameras", expand=True, title_justify="left")
    rows = state.rows(now)
    detector = any(r["boxes"] is not None for r in rows)
    for col in (
        "station",
        "camera",
        "state",
        "latest",
        "class",
        "conf",
        "seq",
        "frames/s",
        "defects/min",
        "ok / defect / uncertain",
        *(("boxes", "boxes seen") if detector else ()),
        "model",
    ):
        cams.add_column(col, no_wrap=True)
    for r in rows:
        up = r["up"]
        state_text = Text("UP", "green") if up else (Text("DOWN", "bold red") if up is False else Text("?", "dim"))
        verdict = r["verdict"]
        c = r["counts"]
        cams.add_row(
            r["station"],
            r["camera"],
            state_text,
            Text(verdict.upper(), VERDICT_STYLE[verdict]) if verdict else Text("-", "dim"),
            r["class"] or "-",
            f"{r['confidence']:.2f}" if r["confidence"] is not None else "-",
            str(r["seq"]) if r["seq"] is not None else "-",
            f"{r['fps']:.1f}",
            f"{r['defects_per_min']:.1f}",
            f"{c.get('ok', 0)} / {c.get('defect', 0)} / {c.get('uncertain', 0)}",
            *(
                (r["boxes"] or "-", ", ".join(f"{n} {k}" for k, n in sorted(r["box_counts"].items())) or "-")
                if detector
                else ()
            ),
            r["model"] or "-",
        )
    events = Table(title="recent defect / uncertain events", expand=True, title_justify="left")
    for col in ("time", "camera", "verdict", "class", "conf", "seq", *(("boxes",) if detector else ()), "snapshot"):
        events.add_column(col, no_wrap=True)
    for e in state.events:
        events.add_row(
            time.strftime("%H:%M:%S", time.localtime(e["captured_at"])),
            e["camera"],
            Text(e["verdict"], VERDICT_STYLE[e["verdict"]]),
            e["class"],
            f"{e['confidence']:.2f}",
            str(e["seq"]),
            *((e["boxes"] or "-",) if detector else ()),
            Path(e["snapshot"]).name if e["snapshot"] else "-",
        )
    stations = ", ".join(f"{s}: {m['state']}" for s, m in sorted(state.stations.items())) or "no status yet"
    footer = Text(
        f"{', '.join(endpoints)}  |  {stations}  |  {state.received} messages"
        + (f", {state.invalid} invalid ({state.last_error})" if state.invalid else ""),
        "dim",
    )
    return Group(cams, events, footer)


def _socket(args: argparse.Namespace) -> Any:
    import zmq

    ctx: Any = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 10000)
    sock.setsockopt(zmq.LINGER, 0)
    if args.curve_server_key:
        from runtime.serving.curve_keys import CurveKeyError, client_keys

        if not args.curve_client_key:
            raise SystemExit("defectscope watch: --curve-server-key needs --curve-client-key (your .key_secret)")
        try:
            client_keys(args.curve_server_key, args.curve_client_key, "--curve").apply(sock)
        except CurveKeyError as exc:
            raise SystemExit(f"defectscope watch: {exc}") from None
    if args.station and args.camera:
        topics = [f"{args.station}.{c}." for c in args.camera] + [f"{args.station}.{STATUS}"]
    elif args.station:
        topics = [f"{args.station}."]
    else:
        topics = [""]
    for t in topics:
        sock.setsockopt_string(zmq.SUBSCRIBE, t)
    for ep in args.connect:
        sock.connect(ep)
    return sock


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="defectscope watch",
        description="Live terminal view of a station's verdicts: per camera state and latest verdict, rates, "
        "recent defect events. Ctrl-C quits.",
    )
    p.add_argument(
        "--connect",
        action="append",
        required=True,
        metavar="ENDPOINT",
        help="daemon's ZeroMQ endpoint, e.g. tcp://line3:5555 (repeat for several stations)",
    )
    p.add_argument("--station", help="only this station (subscribes to its topics only)")
    p.add_argument("--camera", action="append", default=[], help="only this camera (repeatable)")
    p.add_argument(
        "--verdict",
        action="append",
        default=[],
        choices=VERDICTS,
        help="only show these verdicts as latest / events (repeatable)",
    )
    p.add_argument("--events", type=int, default=15, help="recent events listed (default 15)")
    p.add_argument(
        "--stale-after",
        type=float,
        default=5.0,
        metavar="S",
        help="a camera silent for S seconds is shown DOWN (default 5)",
    )
    p.add_argument("--duration", type=float, default=None, metavar="S", help="exit after S seconds")
    p.add_argument(
        "--once",
        action="store_true",
        help="wait for the first messages (up to --timeout), print the view once and exit",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="--once: seconds to wait for a message (default 10)")
    p.add_argument("--json", action="store_true", help="no view: print each (filtered) message as a JSON line")
    p.add_argument("--curve-server-key", help="the daemon's public certificate (CURVE)")
    p.add_argument("--curve-client-key", help="this client's secret certificate (CURVE)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    import zmq

    sock = _socket(args)
    state = ViewerState(args.camera, args.verdict, max_events=args.events, stale_after_s=args.stale_after)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    start = time.monotonic()
    end = start + args.duration if args.duration is not None else None
    if args.once:
        end = start + args.timeout

    def pump(timeout_ms: int) -> int:
        """Receive what is there (waiting up to timeout_ms for the first); returns messages applied."""
        n = 0
        while poller.poll(timeout_ms if n == 0 else 0):
            _topic, payload = sock.recv_multipart()[:2]
            try:
                msg = decode(payload)
            except (ValueError, UnicodeDecodeError, ImportError) as exc:
                state.invalid += 1
                state.last_error = f"undecodable message: {exc}"
                continue
            if state.update(msg, time.monotonic()):
                n += 1
                if args.json:
                    print(json.dumps(msg), flush=True)
        return n

    try:
        if args.json:
            while end is None or time.monotonic() < end:
                got = pump(200)
                if args.once and got:
                    break
            return 0 if state.received else 1
        from rich.console import Console

        console = Console()
        if args.once:
            assert end is not None
            while time.monotonic() < end:
                if pump(200):
                    pump(300)  # a moment more so the view has the station's status too
                    break
            console.print(render(state, time.monotonic(), args.connect))
            return 0 if state.received else 1
        from rich.live import Live

        with Live(
            render(state, time.monotonic(), args.connect), console=console, refresh_per_second=4, screen=False
        ) as live:
            while end is None or time.monotonic() < end:
                pump(250)
                live.update(render(state, time.monotonic(), args.connect))
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close(0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
