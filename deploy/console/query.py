"""The search pages' shared request handling: the page itself, text filters, paging, time range.

``/history`` (verdicts) and ``/alarms`` take the same kind of query: short text filters, some of
them from a fixed set, ``page`` / ``per_page`` as whole numbers, and a ``from`` / ``to`` range in
the line's zone (``tz``). Every bad value is a 400 naming its parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response

if TYPE_CHECKING:
    from deploy.console.app import Console

MAX_TEXT = 128
MAX_PER_PAGE = 200
MAX_PAGE = 10**6


def page_handler(c: Console, html: Path) -> Any:
    """The page's handler: the login page for a visitor without a session, else the static page."""

    async def page(request: Request) -> Response:
        if c.who(request) is None:
            return RedirectResponse("/login", 303)
        c.need(request, "view")
        return FileResponse(html)

    return page


def integer(request: Request, key: str, default: int, lo: int, hi: int) -> int:
    """A whole-number query parameter within [lo, hi]; anything else is a 400 naming the parameter."""
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12 or not lo <= int(raw) <= hi:
        raise HTTPException(400, f"query parameter {key!r}: expected a whole number {lo}..{hi}")
    return int(raw)


@dataclass(frozen=True)
class Query:
    text: dict[str, str | None]  # filter -> value (None: not filtered)
    page: int
    per_page: int
    t0: float | None  # unix seconds, None: open
    t1: float | None

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def yes(self, key: str) -> bool | None:
        """A yes/no filter as a bool (None: not filtered)."""
        v = self.text[key]
        return None if v is None else v == "yes"


def parse_query(request: Request, keys: Sequence[str], choices: Mapping[str, Sequence[str]]) -> Query:
    """Text filters ``keys`` (each at most MAX_TEXT characters; those in ``choices`` one of its values),
    paging and the time range."""
    from deploy.console.app import parse_time, zone_param

    qp = request.query_params
    text = {k: (qp.get(k) or None) for k in keys}
    for k, v in text.items():
        if v is None:
            continue
        if len(v) > MAX_TEXT:
            raise HTTPException(400, f"query parameter {k!r}: at most {MAX_TEXT} characters")
        if k in choices and v not in choices[k]:
            raise HTTPException(400, f"query parameter {k!r}: expected one of {', '.join(choices[k])}")
    per_page = integer(request, "per_page", 50, 1, MAX_PER_PAGE)
    page = integer(request, "page", 1, 1, MAX_PAGE)
    tz = zone_param(request)
    t0 = parse_time(qp.get("from"), float("nan"), tz) if qp.get("from") else None
    t1 = parse_time(qp.get("to"), float("nan"), tz) if qp.get("to") else None
    if t0 is not None and t1 is not None and t1 < t0:
        raise HTTPException(400, "query parameters 'from' / 'to': 'to' is before 'from'")
    return Query(text, page, per_page, t0, t1)
