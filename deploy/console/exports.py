"""CSV export (engineers) and the reviewed rows `defectscope dataset export --from-console URL` reads.

Times in exports are ISO 8601 UTC (``*_utc``) plus unix seconds; cells a spreadsheet would run as a
formula get a leading apostrophe (OWASP CSV injection).
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from deploy.console.app import Console

# OWASP CSV injection: a cell starting with one of these is a formula to Excel / LibreOffice.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
CSV_FIELDS = (
    "station",
    "camera",
    "captured_at_utc",
    "captured_at",
    "source",
    "seq",
    "model_name",
    "model_version",
    "verdict",
    "class",
    "top_class",
    "confidence",
    "top_score",
    "boxes",
    "review_action",
    "review_label",
    "review_user",
    "reviewed_at_utc",
)
MAX_EXPORT_ROWS = 2_000_000


def iso(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: formula prefixes get a leading apostrophe (OWASP)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def routes(c: Console) -> list[Route]:
    from deploy.console.app import _row_json, json_response, parse_time, zone_param

    async def export_csv(request: Request) -> Response:
        c.need(request, "export")
        tz = zone_param(request)
        t0 = parse_time(request.query_params.get("from"), 0.0, tz)
        t1 = parse_time(request.query_params.get("to"), time.time() + 1.0, tz)
        rows = await asyncio.to_thread(c.store.range, t0, t1, MAX_EXPORT_ROWS)

        def lines():
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(CSV_FIELDS)
            for r in rows:
                w.writerow(
                    [
                        cell(v)
                        for v in (
                            r["station"],
                            r["camera"],
                            iso(r["captured_at"]),
                            f"{r['captured_at']:.6f}",
                            r["source"],
                            r["seq"],
                            r["model_name"],
                            r["model_version"],
                            r["verdict"],
                            r["defect_class"] or r["top_class"],
                            r["top_class"],
                            r["confidence"],
                            r["top_score"],
                            r["boxes"] or "",
                            r["review_action"] or "",
                            r["review_label"] or "",
                            r["review_user"] or "",
                            iso(r["reviewed_at"]),
                        )
                    ]
                )
                if buf.tell() > 65536:
                    yield buf.getvalue()
                    buf.seek(0)
                    buf.truncate()
            yield buf.getvalue()

        name = f"verdicts_{int(t0)}_{int(t1)}.csv"
        return StreamingResponse(
            lines(), media_type="text/csv", headers={"content-disposition": f'attachment; filename="{name}"'}
        )

    async def dataset_rows(request: Request) -> Response:
        """Reviewed verdicts (for `defectscope dataset export --from-console URL`)."""
        c.need(request, "export")
        t0 = parse_time(request.query_params.get("from"), 0.0)
        t1 = parse_time(request.query_params.get("to"), float("inf"))
        rows = await asyncio.to_thread(c.store.reviewed, t0, t1)
        return json_response({"good_class": c.cfg.server.good_class, "rows": [_row_json(r) for r in rows]})

    return [Route("/api/export.csv", export_csv), Route("/api/dataset", dataset_rows)]
