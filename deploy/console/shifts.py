"""Shifts and yield: ``[shifts]`` in the console config and GET /api/shifts.

```toml
[shifts]
time_zone = "Europe/Berlin"          # IANA zone of the line; every page shows times in it
names = ["early", "late", "night"]
starts = ["06:00", "14:00", "22:00"]  # local start times; each shift ends where the next begins
```

``GET /api/shifts?count=N`` (1..93): the current shift and the N-1 before it, newest first, each with
per camera ``total, ok, defect, uncertain, yield`` (ok / total; null without frames). Shift bounds
are computed in the zone, so a DST change makes that shift an hour shorter or longer, as on the line.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from runtime.config.strict import refuse_unknown

if TYPE_CHECKING:
    from deploy.console.app import Console

MAX_SHIFTS = 93  # a month of three shifts


class ShiftConfigError(ValueError):
    """A bad [shifts] key; the message names file and key."""


@dataclass(frozen=True)
class Shifts:
    time_zone: str = "UTC"
    names: tuple[str, ...] = ("day",)
    starts: tuple[str, ...] = ("00:00",)

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def instances(self, now: float, count: int) -> list[dict[str, Any]]:
        """The shift running at ``now`` and the ``count`` - 1 before it, newest first: name, start, end (unix s)."""
        tz = self.zone()
        local_now = datetime.fromtimestamp(now, tz)
        starts = sorted((time.fromisoformat(s), n) for s, n in zip(self.starts, self.names))
        bounds: list[tuple[datetime, str]] = []
        day = local_now.date() - timedelta(days=count // len(starts) + 2)
        while day <= local_now.date() + timedelta(days=1):
            bounds += [(datetime.combine(day, t, tz), n) for t, n in starts]
            day += timedelta(days=1)
        out = []
        for (begin, name), (end, _) in zip(bounds, bounds[1:]):
            if begin.timestamp() <= now:
                out.append(
                    {"name": name, "start": begin.timestamp(), "end": end.timestamp(), "date": begin.date().isoformat()}
                )
        return out[::-1][:count]


def parse(data: Any, src: str) -> Shifts | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ShiftConfigError(f"{src}: key 'shifts': expected a table with time_zone, names, starts")
    refuse_unknown(data, ("time_zone", "names", "starts"), src, ShiftConfigError, section="shifts")
    tz = data.get("time_zone", "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ShiftConfigError(
            f"{src}: key 'shifts.time_zone': {tz!r} is not an IANA time zone (like Europe/Berlin)"
        ) from None
    names, starts = data.get("names"), data.get("starts")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and 0 < len(n) <= 32 for n in names):
        raise ShiftConfigError(f"{src}: key 'shifts.names': expected a list of shift names")
    if (
        not isinstance(starts, list)
        or len(starts) != len(names)
        or not all(isinstance(s, str) and re.match(r"^([01]\d|2[0-3]):[0-5]\d$", s) for s in starts)
    ):
        raise ShiftConfigError(f"{src}: key 'shifts.starts': expected one HH:MM start per name")
    if len(set(starts)) != len(starts):
        raise ShiftConfigError(f"{src}: key 'shifts.starts': start times repeat")
    return Shifts(tz, tuple(names), tuple(starts))


def routes(c: Console) -> list[Route]:
    from deploy.console.app import STATIC, json_response, number

    shifts = c.cfg.shifts or Shifts()

    def table(count: int) -> list[dict[str, Any]]:
        import time as _time

        out = []
        for inst in shifts.instances(_time.time(), count):
            cams = c.store.rates(inst["start"], inst["end"])
            for cam in cams:
                cam["ok"] = cam["total"] - cam["defect"] - cam["uncertain"]
                cam["yield"] = cam["ok"] / cam["total"] if cam["total"] else None
            out.append({**inst, "cameras": cams})
        return out

    async def api(request: Request) -> Response:
        c.need(request, "view")
        count = int(number(request, "count", 9, 1, MAX_SHIFTS))
        rows = await asyncio.to_thread(table, count)
        return json_response({"time_zone": shifts.time_zone, "shifts": rows})

    async def page(request: Request) -> Response:
        if c.who(request) is None:
            return RedirectResponse("/login", 303)
        c.need(request, "view")
        return FileResponse(STATIC / "shifts.html")

    return [Route("/api/shifts", api), Route("/shifts", page)]
