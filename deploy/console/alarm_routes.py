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
from starlette.responses import Response
from starlette.routing import Route

from deploy.console.alarm_rules import KINDS
from deploy.console.query import page_handler, parse_query

if TYPE_CHECKING:
    from deploy.console.app import Console


def routes(c: Console) -> list[Route]:
    from deploy.console.app import STATIC, json_response, number

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

    async def search(request: Request) -> Response:
        c.need(request, "view")
        q = parse_query(
            request,
            ("station", "camera", "kind", "state", "acked"),
            {"kind": KINDS, "state": ("open", "cleared"), "acked": ("yes", "no")},
        )
        text = q.text
        rows, total = await asyncio.to_thread(
            c.alarms.search,
            text["station"],
            text["camera"],
            text["kind"],
            None if text["state"] is None else text["state"] == "cleared",
            q.yes("acked"),
            q.t0,
            q.t1,
            q.offset,
            q.per_page,
        )
        return json_response(
            {
                "rows": rows,
                "total": total,
                "page": q.page,
                "per_page": q.per_page,
                "stations": [s.name for s in c.cfg.stations],
                "kinds": list(KINDS),
            }
        )

    return [
        Route("/alarms", page_handler(c, STATIC / "alarms.html")),
        Route("/api/alarms", list_alarms, methods=["GET"]),
        Route("/api/alarms/history", search, methods=["GET"]),
        Route("/api/alarms/{id:str}/ack", ack, methods=["POST"]),
    ]
