"""The console's web application (Starlette): pages, JSON API, WebSocket live feed, snapshots, CSV.

Pages are static HTML shipped in deploy/console/static/ (no build step, no CDN); the JS asks
``/api/me`` who is logged in and opens ``/ws`` for live updates. Role checks happen here,
on every route, not in the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import math
import time
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from deploy.console.admin import routes as admin_routes
from deploy.console.alarm_routes import routes as alarm_routes
from deploy.console.alarms import Alarms
from deploy.console.auth import CAN, COOKIE, Session, Sessions, csrf_ok
from deploy.console.config import ConsoleConfig, ConsoleConfigError
from deploy.console.exports import routes as export_routes
from deploy.console.history import routes as history_routes
from deploy.console.live import Live, dumps
from deploy.console.login import LoginGate
from deploy.console.metrics import ConsoleMetrics
from deploy.console.middleware import install
from deploy.console.shifts import routes as shift_routes
from deploy.console.snapfiles import RecentSnapshots, SnapshotRefused, read_snapshot
from deploy.console.store import REVIEW_ACTIONS, Store, StoreError
from deploy.console.streams import Streams
from deploy.console.users import Users
from deploy.console.webhook import Webhook, read_secret

STATIC = Path(__file__).with_name("static")
KIOSK = Session("kiosk", "kiosk", "", float("inf"))
MAX_TIME_S = 1e11  # |unix seconds| beyond this (year 5138) is not a time, it is an attack
WS_SESSION_ENDED = 4401  # close code: the session was logged out or expired


def parse_time(value: str | None, default: float, tz: tzinfo | None = None) -> float:
    """ISO 8601 (naive = in ``tz``, else UTC) or unix seconds."""
    if value is None or value == "":
        return default
    try:
        t = float(value)
    except ValueError:
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise HTTPException(400, f"time {value[:40]!r}: expected ISO 8601 or unix seconds") from None
        t = (dt if dt.tzinfo else dt.replace(tzinfo=tz or timezone.utc)).timestamp()
    if not math.isfinite(t) or abs(t) > MAX_TIME_S:
        raise HTTPException(400, f"time {value[:40]!r}: expected a finite time within +-{MAX_TIME_S:.0e} s")
    return t


def zone_param(request: Request) -> tzinfo | None:
    """``tz``: the IANA zone naive ``from`` / ``to`` times are in (pages send the line's zone)."""
    name = request.query_params.get("tz")
    if not name:
        return None
    try:
        return ZoneInfo(name[:64])
    except (ZoneInfoNotFoundError, ValueError):
        raise HTTPException(400, "query parameter 'tz': expected an IANA time zone like Europe/Berlin") from None


def number(request: Request, key: str, default: float, lo: float, hi: float) -> float:
    """A numeric query parameter within [lo, hi]; anything else is a 400 naming the parameter."""
    raw = request.query_params.get(key)
    try:
        value = default if raw is None else float(raw)
    except ValueError:
        raise HTTPException(400, f"query parameter {key!r}: expected a number") from None
    if not lo <= value <= hi:
        raise HTTPException(400, f"query parameter {key!r}: expected {lo}..{hi}")
    return value


ERROR_TITLES = {
    400: "Bad request",
    401: "Please log in",
    403: "Not allowed",
    404: "Not found",
    413: "Too large",
    429: "Too many attempts",
}


async def http_error(request: Request, exc: Exception) -> Response:
    """Browsers asking for a page get a styled error page; API clients and scripts keep plain text."""
    assert isinstance(exc, HTTPException)
    detail = str(exc.detail)
    if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
        return PlainTextResponse(detail, exc.status_code, headers=exc.headers)
    page = (STATIC / "error.html").read_text(encoding="utf-8")
    for key, value in (
        ("{code}", str(exc.status_code)),
        ("{title}", ERROR_TITLES.get(exc.status_code, "Error")),
        ("{detail}", html.escape(detail)),
    ):
        page = page.replace(key, value)
    return HTMLResponse(page, exc.status_code, headers=exc.headers)


def json_response(value: Any, status: int = 200) -> Response:
    """JSON for browsers and clients: never NaN / Infinity (stored data may hold them)."""
    return Response(dumps(value), status_code=status, media_type="application/json")


def _row_json(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in r.items() if k != "snapshot_path"}
    for k in ("boxes", "review_boxes"):
        if isinstance(out.get(k), str):
            out[k] = json.loads(out[k])
    return out


class Console:
    def __init__(self, cfg: ConsoleConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.live = Live(cfg)
        self.users = Users(store.engine)
        self.users.seed(cfg.users)  # the TOML seeds users that do not exist yet (the first admin)
        self.sessions = Sessions(self.users, cfg.server.session_max_age_s)
        self.metrics = ConsoleMetrics()
        self.streams = Streams(cfg, store, self.live, self.metrics)
        try:
            secret = read_secret(cfg.alarms.webhook_secret_file)
        except OSError as exc:
            raise ConsoleConfigError(f"{cfg.source}: key 'alarms.webhook_secret_file': {exc.strerror}") from None
        self.webhook = Webhook(
            cfg.alarms.webhook_urls, secret, cfg.alarms.webhook_repeat_s, self.metrics.webhook_failed.inc
        )
        self.alarms = Alarms(cfg.alarms, store.engine, self.live, self._alarm_changed)
        self.streams.alarms = self.alarms
        self.gate = LoginGate(cfg.server, self.sessions, self.metrics)
        self.recent_snapshots = RecentSnapshots()  # one read of a new snapshot serves every browser

    def _alarm_changed(self, event: str, alarm: Any) -> None:
        views = self.alarms.views()
        self.metrics.alarm_events.labels(event).inc()
        self.metrics.alarms_open.set(len(views))
        self.metrics.alarms_unacknowledged.set(sum(1 for v in views if v["acked_at"] is None))
        self.webhook.notify(event, alarm and alarm.view(), views)

    # -- access --------------------------------------------------------------------------------
    def who(self, request: Request | WebSocket) -> Session | None:
        s = self.sessions.get(request.cookies.get(COOKIE))
        if s is None and self.cfg.server.kiosk:
            return KIOSK
        return s

    def need(self, request: Request | WebSocket, what: str) -> Session:
        s = self.who(request)
        if s is None:
            raise HTTPException(401, "log in first")
        if s.role not in CAN[what]:
            raise HTTPException(403, f"role {s.role!r} may not {what}")
        return s

    @staticmethod
    def same_origin(request: Request | WebSocket) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            return True  # non-browser clients; browsers always send Origin on POST and WebSocket
        return origin == f"{request.url.scheme.replace('ws', 'http')}://{request.headers.get('host', '')}"

    def need_change(self, request: Request, what: str, supplied: str | None) -> Session:
        s = self.need(request, what)
        if not self.same_origin(request) or not csrf_ok(s, supplied):
            raise HTTPException(403, "CSRF check failed (reload the page)")
        return s

    # -- pages ---------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        if self.who(request) is None:
            return RedirectResponse("/login", 303)
        return FileResponse(STATIC / "index.html")

    async def login_page(self, request: Request) -> Response:
        return FileResponse(STATIC / "login.html")

    async def login(self, request: Request) -> Response:
        if not self.same_origin(request):
            raise HTTPException(403, "cross-origin login refused")
        form = await request.form()
        address = request.client.host if request.client else "-"
        got = await self.gate.login(str(form.get("user", ""))[:64], str(form.get("password", ""))[:1024], address)
        if isinstance(got, int):  # locked or busy: seconds to wait
            return Response(
                f"too many login attempts: try again in {got} s\n",
                429,
                {"retry-after": str(got)},
                media_type="text/plain",
            )
        if got is None:
            return RedirectResponse("/login?failed=1", 303)
        token, _ = got
        resp = RedirectResponse("/", 303)
        resp.set_cookie(
            COOKIE,
            token,
            max_age=self.cfg.server.session_max_age_s,
            httponly=True,
            samesite="strict",
            secure=self.cfg.server.secure_cookies,
            path="/",
        )
        return resp

    async def logout(self, request: Request) -> Response:
        s = self.sessions.get(request.cookies.get(COOKIE))
        form = await request.form()
        if s is not None and (not self.same_origin(request) or not csrf_ok(s, str(form.get("csrf", "")))):
            raise HTTPException(403, "CSRF check failed")
        token = request.cookies.get(COOKIE)
        self.sessions.logout(token)
        if token:
            self.streams.close_clients(token, WS_SESSION_ENDED)  # its live sockets stop receiving now
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    async def export_page(self, request: Request) -> Response:
        s = self.who(request)
        if s is None:
            return RedirectResponse("/login", 303)
        self.need(request, "export")
        return FileResponse(STATIC / "export.html")

    # -- API -----------------------------------------------------------------------------------
    async def me(self, request: Request) -> Response:
        s = self.need(request, "view")
        return json_response(
            {
                "user": s.user,
                "role": s.role,
                "csrf": s.csrf,
                "kiosk": s is KIOSK,
                "can": sorted(k for k, roles in CAN.items() if s.role in roles),
                "shift_hours": self.cfg.server.shift_hours,
                "time_zone": self.cfg.shifts.time_zone if self.cfg.shifts else None,
                "good_class": self.cfg.server.good_class,
            }
        )

    async def state(self, request: Request) -> Response:
        self.need(request, "view")
        return json_response(self.live.full())

    async def events(self, request: Request) -> Response:
        self.need(request, "view")
        limit = int(number(request, "limit", self.cfg.server.events, 1, 500))
        rows = await asyncio.to_thread(self.store.recent_events, limit)
        return json_response([_row_json(r) for r in rows])

    async def verdict(self, request: Request) -> Response:
        self.need(request, "view")
        row = await asyncio.to_thread(self.store.get, request.path_params["uid"])
        if row is None:
            raise HTTPException(404, "no such verdict")
        return json_response(_row_json(row))

    async def review(self, request: Request) -> Response:
        s = self.need_change(request, "review", request.headers.get("x-csrf-token"))
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "expected a JSON body") from None
        action, label, boxes = body.get("action"), body.get("label"), body.get("boxes")
        if action not in REVIEW_ACTIONS:
            raise HTTPException(400, f"key 'action': expected one of {REVIEW_ACTIONS}")
        if label is not None and (
            not isinstance(label, str) or not 0 < len(label) <= 128 or "/" in label or label.startswith(".")
        ):
            raise HTTPException(400, "key 'label': expected a class name")
        if action == "reject":
            label = None
        if boxes is not None and not _valid_boxes(boxes):
            raise HTTPException(400, "key 'boxes': expected up to 100 {box: [x1, y1, x2, y2], class} objects")
        try:
            row = await asyncio.to_thread(
                self.store.review, request.path_params["uid"], action, s.user, s.role, label, boxes
            )
        except KeyError:
            raise HTTPException(404, "no such verdict") from None
        except StoreError as exc:
            raise HTTPException(400, str(exc)) from None
        return json_response(row)

    async def rates(self, request: Request) -> Response:
        self.need(request, "view")
        hours = number(request, "hours", self.cfg.server.shift_hours, 0.01, 24 * 366)
        rows = await asyncio.to_thread(self.store.rates, time.time() - hours * 3600.0)
        return json_response({"hours": hours, "cameras": rows})

    async def snapshot(self, request: Request) -> Response:
        self.need(request, "view")
        st = self.cfg.station(request.path_params["station"])
        if st is None or st.snapshot_dir is None:
            raise HTTPException(404, "no snapshot directory for this station")
        name = request.path_params["name"]
        data = self.recent_snapshots.get(st.snapshot_dir, name)
        if data is None:
            try:
                data = await asyncio.to_thread(read_snapshot, st.snapshot_dir, name, self.cfg.server.max_snapshot_bytes)
            except SnapshotRefused as exc:
                raise HTTPException(exc.status, exc.reason) from None
            self.recent_snapshots.put(st.snapshot_dir, name, data)
        kind = "image/jpeg" if request.path_params["name"].endswith(".jpg") else "application/json"
        return Response(data, media_type=kind, headers={"cache-control": "private, max-age=3600"})

    async def preview(self, request: Request) -> Response:
        self.need(request, "view")
        tile = self.live.tiles.get(f"{request.path_params['station']}/{request.path_params['camera']}")
        if tile is None or tile.preview is None:
            raise HTTPException(404, "no preview")
        return Response(tile.preview, media_type="image/jpeg", headers={"cache-control": "no-store"})

    async def healthz(self, request: Request) -> Response:
        return json_response(
            {
                "ok": True,
                "received": self.live.received,
                "recorded": self.streams.recorded,
                "pending": len(self.streams.pending),
                "dead_letters": self.streams.dead_letters,
            }
        )

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def ws(self, websocket: WebSocket) -> None:
        s = self.who(websocket)
        if s is None or not self.same_origin(websocket):
            await websocket.close(code=4403)
            return
        token = None if s is KIOSK else websocket.cookies.get(COOKIE)
        await websocket.accept()
        q = self.streams.subscribe_client(token)
        try:
            await websocket.send_text(dumps(self.live.full()))
            alarms = self.streams.alarm_message()
            if alarms is not None:
                await websocket.send_text(alarms)
            while True:
                msg = await q.get()
                if isinstance(msg, int):  # 1001 shutting down (browsers reconnect), 4401 logged out
                    await websocket.close(code=msg)
                    return
                if token is not None and self.sessions.get(token) is None:  # expired since
                    await websocket.close(code=WS_SESSION_ENDED)
                    return
                await websocket.send_text(msg)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.streams.unsubscribe_client(q)


def _valid_boxes(boxes: Any) -> bool:
    if not isinstance(boxes, list) or len(boxes) > 100:
        return False
    for b in boxes:
        if not isinstance(b, dict) or not isinstance(b.get("box"), list) or len(b["box"]) != 4:
            return False
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e5 for v in b["box"]):
            return False
        if not isinstance(b.get("class"), str) or not b["class"] or len(b["class"]) > 128:
            return False
    return True


def _check_curve_keys(cfg: ConsoleConfig) -> None:
    """Refuse a CURVE secret key other local accounts could read, as the station daemon does."""
    from runtime.serving.curve_keys import secret_key_problem

    for i, st in enumerate(cfg.stations):
        if st.curve is not None and (why := secret_key_problem(st.curve.client_secret_key)):
            raise ConsoleConfigError(f"{cfg.source}: key 'stations[{i}].curve.client_secret_key': {why}")


def create_app(cfg: ConsoleConfig, store: Store | None = None) -> Starlette:
    _check_curve_keys(cfg)
    store = store or Store(cfg.store.url, cfg.store.retention_days)
    c = Console(cfg, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        app.state.loop = asyncio.get_running_loop()
        c.streams.start()
        c.webhook.start()
        try:
            yield
        finally:
            await c.streams.stop()
            await asyncio.to_thread(c.webhook.stop)

    routes = [
        Route("/", c.index),
        Route("/login", c.login_page, methods=["GET"]),
        Route("/login", c.login, methods=["POST"]),
        Route("/logout", c.logout, methods=["POST"]),
        Route("/export", c.export_page),
        Route("/api/me", c.me),
        Route("/api/state", c.state),
        Route("/api/events", c.events),
        Route("/api/verdicts/{uid:str}", c.verdict),
        Route("/api/verdicts/{uid:str}/review", c.review, methods=["POST"]),
        Route("/api/rates", c.rates),
        *export_routes(c),
        Route("/snapshots/{station:str}/{name:str}", c.snapshot),
        Route("/preview/{station:str}/{camera:str}.jpg", c.preview),
        Route("/healthz", c.healthz),
        Route("/metrics", c.metrics_text),
        *admin_routes(c),
        *alarm_routes(c),
        *history_routes(c),
        *shift_routes(c),
        WebSocketRoute("/ws", c.ws),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    install(app, cfg.server, c.metrics.bodies_refused.inc)
    app.state.console = c
    return app
