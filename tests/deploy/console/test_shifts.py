"""Shifts and yield: shift bounds in the line's zone, per camera per shift counts over a real store, and the
shift table and inline SVG chart in a real Chromium (marked `browser`)."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from deploy.console.config import ConsoleConfigError, from_dict
from deploy.console.loadgen import verdict_message
from deploy.console.shifts import Shifts
from deploy.console.store import Store, row_from_message
from tests.deploy.console.conftest import Client
from tests.deploy.console.test_browser import browser, login  # noqa: F401

SHIFTS = Shifts("Europe/Berlin", ("early", "late", "night"), ("06:00", "14:00", "22:00"))
TOML = (
    '[shifts]\ntime_zone = "Europe/Berlin"\nnames = ["early", "late", "night"]\nstarts = ["06:00", "14:00", "22:00"]\n'
)


def test_shift_bounds_follow_the_zone_and_dst():
    tz = ZoneInfo("Europe/Berlin")
    at = datetime(2026, 3, 29, 12, 0, tzinfo=tz).timestamp()  # DST began at 02:00 that morning
    now, before, night = SHIFTS.instances(at, 3)
    assert (now["name"], before["name"], night["name"]) == ("early", "night", "late")
    assert datetime.fromtimestamp(now["start"], tz).hour == 6 and now["end"] - now["start"] == 8 * 3600
    assert before["end"] - before["start"] == 7 * 3600  # the night the clocks went forward
    with pytest.raises(ConsoleConfigError, match="shifts.time_zone"):
        from_dict({"shifts": {"time_zone": "Mars/Olympus", "names": ["a"], "starts": ["06:00"]}})
    with pytest.raises(ConsoleConfigError, match="shifts.starts"):
        from_dict({"shifts": {"names": ["a", "b"], "starts": ["06:00"]}})


def _seed(tmp_path) -> tuple[str, list[dict]]:
    now, prev = SHIFTS.instances(time.time(), 2)
    db = f"sqlite:///{tmp_path / 'results.db'}"
    store = Store(db, retention_days=0)
    rows = []
    plan = {
        now["start"]: ["ok"] * 6 + ["defect"] * 3 + ["uncertain"],  # cam1 this shift: yield 60 %
        prev["start"]: ["ok"] * 9 + ["defect"],
    }  # cam1 last shift: yield 90 %
    for start, verdicts in plan.items():
        for i, v in enumerate(verdicts):
            rows.append(row_from_message(verdict_message("st1", "cam1", i, v, captured_at=start + 1 + i), None))
    rows.append(row_from_message(verdict_message("st1", "cam2", 99, "ok", captured_at=now["start"] + 5), None))
    store.insert(rows)
    store.close()
    return db, [now, prev]


def test_per_camera_per_shift_counts_and_yield(tmp_path, console_factory):
    db, (now, prev) = _seed(tmp_path)
    con = console_factory([], store=db, extra_toml=TOML)
    c = Client(con.base)
    assert c.login("olga") == 200
    body = c.json("/api/shifts?count=2")
    assert body["time_zone"] == "Europe/Berlin" and [s["start"] for s in body["shifts"]] == [
        now["start"],
        prev["start"],
    ]
    cur = {x["camera"]: x for x in body["shifts"][0]["cameras"]}
    assert (cur["cam1"]["ok"], cur["cam1"]["defect"], cur["cam1"]["uncertain"], cur["cam1"]["yield"]) == (6, 3, 1, 0.6)
    assert cur["cam2"]["yield"] == 1.0
    (last,) = body["shifts"][1]["cameras"]
    assert last["yield"] == 0.9
    assert c.get("/api/shifts?count=0")[0] == 400


@pytest.mark.browser
def test_shift_table_and_chart_in_the_page(tmp_path, browser, console_factory):  # noqa: F811
    db, (now, prev) = _seed(tmp_path)
    con = console_factory([], store=db, extra_toml=TOML)
    page = login(browser, con.base, "olga", wait_live=False)
    page.wait_for_selector('#rates tr[data-camera="st1/cam1"]')  # the live page: the running shift
    cells = page.eval_on_selector_all('#rates tr[data-camera="st1/cam1"] td', "ts => ts.map(t => t.textContent)")
    assert cells == ["st1/cam1", "6", "3", "1", "60.0%"]
    page.goto(con.base + "/shifts")
    page.wait_for_selector("body[data-ready='1']")
    assert "Europe/Berlin" in page.inner_text("#zone")
    rows = page.eval_on_selector_all('#shift-table tr[data-camera="st1/cam1"]', "ts => ts.map(t => t.innerText)")
    assert len(rows) == 2 and "60.0%" in rows[0] and "90.0%" in rows[1]
    assert "CET" in rows[0] or "+01" in rows[0] or "GMT+1" in rows[0] or "CEST" in rows[0]  # the zone is shown
    pts = page.get_attribute('#chart polyline[data-camera="st1/cam1"]', "points").split()
    assert len(pts) == 2 and float(pts[0].split(",")[1]) < float(
        pts[1].split(",")[1]
    )  # 90 % then 60 % (SVG y grows down)
    assert page.locator("script[src^='http']").count() == 0  # nothing from a CDN
