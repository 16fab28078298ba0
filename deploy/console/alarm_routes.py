"""Alarm routes: GET /api/alarms (open alarms + history), POST /api/alarms/{id}/ack (operators and up), and the
alarms page: ``/alarms`` over GET /api/alarms/history (anyone who may view, like /history).

``/api/alarms/history`` query, every parameter checked (a bad one is a 400 naming it): ``station``,
``camera`` (exact, at most 128 characters), ``kind`` (a rule kind), ``state`` (``open``: the condition
still holds | ``cleared``), ``acked`` (``yes`` | ``no``), ``from`` / ``to`` (``raised_at``; ISO 8601 or unix
seconds; naive times in ``tz``, else UTC), ``page`` (from 1) and ``per_page`` (1..200). Newest first;
-> ``{rows, total, page, per_page, stations, kinds}``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from deploy.console.alarm_rules import KINDS

if TYPE_CHECKING:
    from deploy.console.app import Console

MAX_TEXT = 128
MAX_PER_PAGE = 200
MAX_PAGE = 10**6


def _integer(request: Request, key: str, default: int, lo: int, hi: int) -> int:
    """A whole-number query parameter within [lo, hi]; anything else is a 400 naming the parameter."""
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        raise HTTPException(400, f"query parameter {key!r}: expected a whole number {lo}..{hi}")
    value = int(raw)
    if not lo <= value <= hi:
        raise HTTPException(400, f"query parameter {key!r}: expected a whole number {lo}..{hi}")
    return value


def routes(c: Console) -> list[Route]:
    from deploy.console.app import STATIC, json_response, number, parse_time, zone_param

    async def list_alarms(request: Request) -> Response:
        c.need(request, "view")
        limit = int(number(request, "limit", 200, 1, 5000))
        history = await asyncio.to_thread(c.alarms.history, limit)
        return json_response({"open": c.alarms.views(), "history": history, "sound": c.cfg.alarms.sound})

    async def ack(request: Request) -> Response:
        s = c.need_change(request, "review", request.headers.get("x-csrf-token"))
        try:
            alarm_id = int(request.path_params["id"])
        except ValueError:
            raise HTTPException(400, "alarm id: expected an integer") from None
        a = c.alarms.ack(alarm_id, s.user)
        if a is None:
            raise HTTPException(404, "no open alarm with this id")
        return json_response(a.view())

    async def page(request: Request) -> Response:
        if c.who(request) is None:
            return RedirectResponse("/login", 303)
        c.need(request, "view")
        return FileResponse(STATIC / "alarms.html")

    async def search(request: Request) -> Response:
        c.need(request, "view")
        qp = request.query_params
        text = {k: (qp.get(k) or None) for k in ("station", "camera", "kind", "state", "acked")}
        for k, v in text.items():
            if v is not None and len(v) > MAX_TEXT:
                raise HTTPException(400, f"query parameter {k!r}: at most {MAX_TEXT} characters")
        if text["kind"] is not None and text["kind"] not in KINDS:
            raise HTTPException(400, f"query parameter 'kind': expected one of {', '.join(KINDS)}")
        if text["state"] not in (None, "open", "cleared"):
            raise HTTPException(400, "query parameter 'state': expected open or cleared")
        if text["acked"] not in (None, "yes", "no"):
            raise HTTPException(400, "query parameter 'acked': expected yes or no")
        per_page = _integer(request, "per_page", 50, 1, MAX_PER_PAGE)
        page_no = _integer(request, "page", 1, 1, MAX_PAGE)
        tz = zone_param(request)
        t0 = parse_time(qp.get("from"), float("nan"), tz) if qp.get("from") else None
        t1 = parse_time(qp.get("to"), float("nan"), tz) if qp.get("to") else None
        if t0 is not None and t1 is not None and t1 < t0:
            raise HTTPException(400, "query parameters 'from' / 'to': 'to' is before 'from'")
        rows, total = await asyncio.to_thread(
            c.alarms.search,
            text["station"],
            text["camera"],
            text["kind"],
            None if text["state"] is None else text["state"] == "cleared",
            None if text["acked"] is None else text["acked"] == "yes",
            t0,
            t1,
            (page_no - 1) * per_page,
            per_page,
        )
        return json_response(
            {
                "rows": rows,
                "total": total,
                "page": page_no,
                "per_page": per_page,
                "stations": [s.name for s in c.cfg.stations],
                "kinds": list(KINDS),
            }
        )

    return [
        Route("/alarms", page),
        Route("/api/alarms", list_alarms, methods=["GET"]),
        Route("/api/alarms/history", search, methods=["GET"]),
        Route("/api/alarms/{id:str}/ack", ack, methods=["POST"]),
    ]
