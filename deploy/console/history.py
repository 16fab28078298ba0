"""History, search and the review queue: the /history page and GET /api/history over the store.

Query: ``station, camera, class, verdict`` (exact), ``reviewed`` (``yes`` | ``no``), ``from`` / ``to``
(ISO 8601 or unix seconds; naive times in ``tz``, else UTC), ``page`` (from 1) and ``per_page`` (1..200). Newest first.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import sqlalchemy as sa
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from deploy.console.store import verdicts

if TYPE_CHECKING:
    from deploy.console.app import Console

VERDICTS = ("ok", "defect", "uncertain")
MAX_CLASSES = 64


def routes(c: Console) -> list[Route]:
    from deploy.console.app import STATIC, _row_json, json_response, number, parse_time, zone_param

    def classes() -> list[str]:
        q = sa.select(sa.func.coalesce(verdicts.c.defect_class, verdicts.c.top_class)).distinct().limit(MAX_CLASSES)
        with c.store.engine.connect() as conn:
            return sorted({str(v) for (v,) in conn.execute(q)} | {c.cfg.server.good_class})

    async def page(request: Request) -> Response:
        if c.who(request) is None:
            return RedirectResponse("/login", 303)
        c.need(request, "view")
        return FileResponse(STATIC / "history.html")

    async def search(request: Request) -> Response:
        c.need(request, "view")
        qp = request.query_params
        text = {k: (qp.get(k) or None) for k in ("station", "camera", "class", "verdict", "reviewed")}
        for k, v in text.items():
            if v is not None and len(v) > 128:
                raise HTTPException(400, f"query parameter {k!r}: at most 128 characters")
        if text["verdict"] is not None and text["verdict"] not in VERDICTS:
            raise HTTPException(400, f"query parameter 'verdict': expected one of {VERDICTS}")
        if text["reviewed"] not in (None, "yes", "no"):
            raise HTTPException(400, "query parameter 'reviewed': expected yes or no")
        per_page = int(number(request, "per_page", 50, 1, 200))
        page_no = int(number(request, "page", 1, 1, 10**6))
        tz = zone_param(request)
        t0 = parse_time(qp.get("from"), float("nan"), tz) if qp.get("from") else None
        t1 = parse_time(qp.get("to"), float("nan"), tz) if qp.get("to") else None
        rows, total = await asyncio.to_thread(
            c.store.search,
            text["station"],
            text["camera"],
            text["class"],
            text["verdict"],
            None if text["reviewed"] is None else text["reviewed"] == "yes",
            t0,
            t1,
            (page_no - 1) * per_page,
            per_page,
        )
        return json_response(
            {
                "rows": [_row_json(r) for r in rows],
                "total": total,
                "page": page_no,
                "per_page": per_page,
                "classes": await asyncio.to_thread(classes),
                "stations": [s.name for s in c.cfg.stations],
            }
        )

    return [Route("/history", page), Route("/api/history", search)]
