"""History, search and the review queue: the /history page and GET /api/history over the store.

Query: ``station, camera, class, verdict`` (exact), ``reviewed`` (``yes`` | ``no``), ``from`` / ``to``
(ISO 8601 or unix seconds; naive times in ``tz``, else UTC), ``page`` (from 1) and ``per_page`` (1..200). Newest first.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from deploy.console.query import page_handler, parse_query
from deploy.console.store import verdicts

if TYPE_CHECKING:
    from deploy.console.app import Console

VERDICTS = ("ok", "defect", "uncertain")
MAX_CLASSES = 64


def routes(c: Console) -> list[Route]:
    from deploy.console.app import STATIC, _row_json, json_response

    def classes() -> list[str]:
        q = sa.select(sa.func.coalesce(verdicts.c.defect_class, verdicts.c.top_class)).distinct().limit(MAX_CLASSES)
        with c.store.engine.connect() as conn:
            return sorted({str(v) for (v,) in conn.execute(q)} | {c.cfg.server.good_class})

    async def search(request: Request) -> Response:
        c.need(request, "view")
        q = parse_query(
            request,
            ("station", "camera", "class", "verdict", "reviewed"),
            {"verdict": VERDICTS, "reviewed": ("yes", "no")},
        )
        text = q.text
        rows, total = await asyncio.to_thread(
            c.store.search,
            text["station"],
            text["camera"],
            text["class"],
            text["verdict"],
            q.yes("reviewed"),
            q.t0,
            q.t1,
            q.offset,
            q.per_page,
        )
        return json_response(
            {
                "rows": [_row_json(r) for r in rows],
                "total": total,
                "page": q.page,
                "per_page": q.per_page,
                "classes": await asyncio.to_thread(classes),
                "stations": [s.name for s in c.cfg.stations],
            }
        )

    return [Route("/history", page_handler(c, STATIC / "history.html")), Route("/api/history", search)]
