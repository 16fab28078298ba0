"""Alarm routes: GET /api/alarms (open alarms + history), POST /api/alarms/{id}/ack (operators and up)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:
    from deploy.console.app import Console


def routes(c: Console) -> list[Route]:
    from deploy.console.app import json_response, number

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

    return [
        Route("/api/alarms", list_alarms, methods=["GET"]),
        Route("/api/alarms/{id:str}/ack", ack, methods=["POST"]),
    ]
