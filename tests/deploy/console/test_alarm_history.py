"""The alarms page's API, GET /api/alarms/history, over a real store and a real console: filters, paging
bounds, every bad parameter a 400 naming it, the history page's auth; and in a real Chromium (marked
`browser`): an alarm raised by a station stream, acknowledged in the live banner, listed on /alarms with who
and when, in German too, with a station's hostile camera name shown as text and a keyboard-only acknowledge."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from deploy.console.alarm_rules import KINDS
from deploy.console.store import Store
from deploy.console.store import alarms as alarms_table
from tests.deploy.console.conftest import Client, wait_for
from tests.deploy.console.test_browser import browser, login  # noqa: F401  (the module's Chromium fixture)

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
N = 30


def _seed(tmp_path) -> str:
    """30 alarms one minute apart: st1/st2 in turn; every 3rd still active, every 2nd acknowledged by olga."""
    db = f"sqlite:///{tmp_path / 'results.db'}"
    store = Store(db, retention_days=0)
    rows = []
    for i in range(N):
        raised = T0 + 60 * i
        rows.append(
            {
                "rule": f"rule {i % 3}",
                "kind": KINDS[i % 3],
                "station": "st1" if i % 2 else "st2",
                "camera": None if i % 5 == 4 else f"cam{i % 2 + 1}",
                "message": f"alarm {i}",
                "message_key": "alarm.defects_in_row",
                "message_args": json.dumps({"station": "st", "camera": "c", "n": i}),
                "raised_at": raised,
                "cleared_at": None if i % 3 == 0 else raised + 30,
                "acked_by": "olga" if i % 2 == 0 else None,
                "acked_at": raised + 10 if i % 2 == 0 else None,
            }
        )
    with store.engine.begin() as conn:
        conn.execute(alarms_table.insert(), rows)
    store.close()
    return db


def _stations() -> list[dict[str, str]]:
    return [{"name": "st1", "endpoint": "tcp://127.0.0.1:1"}, {"name": "st2", "endpoint": "tcp://127.0.0.1:2"}]


def test_alarm_history_filters_paging_bad_parameters_and_auth(tmp_path, console_factory):
    con = console_factory(_stations(), store=_seed(tmp_path))
    anon = Client(con.base)
    assert anon.get("/api/alarms/history")[0] == 401
    status, _, headers = anon.get("/alarms")
    assert status == 303 and headers["location"] == "/login"

    c = Client(con.base)
    assert c.login("olga") == 200
    status, body, headers = c.get("/alarms")
    assert status == 200 and b'id="alarm-rows"' in body
    page = c.json("/api/alarms/history?per_page=10")
    assert (page["total"], page["page"], page["per_page"]) == (N, 1, 10)
    assert [r["message"] for r in page["rows"]][:2] == ["alarm 29", "alarm 28"]  # newest first
    assert page["stations"] == ["st1", "st2"] and page["kinds"] == list(KINDS)
    assert page["rows"][1]["message_args"] == {"station": "st", "camera": "c", "n": 28}  # JSON, for the page
    assert c.json("/api/alarms/history?per_page=10&page=3")["rows"][-1]["message"] == "alarm 0"
    assert c.json("/api/alarms/history?per_page=10&page=4")["rows"] == []
    assert c.json("/api/alarms/history")["per_page"] == 50  # the default, bounded

    def total(q: str) -> int:
        return c.json("/api/alarms/history?" + q)["total"]

    assert total("station=st1") == 15 and total("station=st2&camera=cam1") == 12
    assert total(f"kind={KINDS[1]}") == 10
    # still active (never cleared); acknowledged; both
    assert total("state=open") == 5 and total("state=cleared") == N - 5  # unacknowledged ones were cleared at start
    assert total("acked=yes") == 15 and total("acked=no") == 15
    assert total("state=open&acked=yes") == 5
    assert total(f"from={T0 + 600:.0f}&to={T0 + 1200:.0f}") == 10  # raised_at in [from, to)
    # naive times are in the zone the page sends: T0 + 600 is 23:23:20 in Berlin (CET)
    assert total("from=2023-11-14T23:23:20&tz=Europe/Berlin") == 20
    assert total("from=2023-11-14T22:23:20") == 20  # no tz: UTC
    assert total("station=" + urllib.parse.quote("st1' OR '1'='1")) == 0  # bound parameters, not SQL text

    bad = {
        "kind=bogus": "'kind'",
        "state=maybe": "'state'",
        "acked=1": "'acked'",
        "per_page=0": "'per_page'",
        "per_page=201": "'per_page'",
        "per_page=1e2": "'per_page'",
        "page=0": "'page'",
        "page=1.5": "'page'",
        "page=-1": "'page'",
        "page=99999999999999": "'page'",
        "from=yesterday": "'yesterday'",
        "to=nan": "'nan'",
        "from=2023-11-14T23:00&tz=Mars/Base": "'tz'",
        f"from={T0 + 60:.0f}&to={T0:.0f}": "'to' is before 'from'",
        "station=" + "x" * 129: "'station'",
        "camera=" + "x" * 129: "'camera'",
    }
    for q, why in bad.items():
        status, body, _ = c.get("/api/alarms/history?" + q)
        assert status == 400 and why in body.decode() and len(body.decode().splitlines()) == 1, (q, status, body)

    # acknowledging an unacknowledged row: the history has who and when
    row = c.json("/api/alarms/history?acked=no&per_page=1")["rows"][0]
    status, _, _ = c.request("POST", f"/api/alarms/{row['id']}/ack", b"", {"origin": c.base, "x-csrf-token": c.csrf})
    assert status == 200
    got = next(r for r in c.json("/api/alarms/history?acked=yes&per_page=200")["rows"] if r["id"] == row["id"])
    assert got["acked_by"] == "olga" and got["acked_at"] >= T0
    assert total("acked=no") == 14

    eng = Client(con.base)  # any role that may view the history may view the alarms
    assert eng.login("erik") == 200 and eng.json("/api/alarms/history")["total"] == N


def test_the_kiosk_sees_the_alarm_history_but_cannot_acknowledge(tmp_path, console_factory):
    con = console_factory(_stations(), store=_seed(tmp_path), kiosk=True)
    k = Client(con.base)
    assert k.json("/api/alarms/history?acked=no")["total"] == 15
    row = k.json("/api/alarms/history?acked=no&per_page=1")["rows"][0]
    assert k.request("POST", f"/api/alarms/{row['id']}/ack", b"", {"origin": k.base})[0] == 403


HOSTILE = '<img src=x onerror="window.pwned=1">'


def _hostile_row(tmp_path) -> str:
    """An old row with a camera name the console's streams would refuse today (another writer, an older console)."""
    db = f"sqlite:///{tmp_path / 'results.db'}"
    store = Store(db, retention_days=0)
    row = {
        "rule": HOSTILE,
        "kind": "camera_down",
        "station": "st1",
        "camera": HOSTILE,
        "message": f"st1/{HOSTILE}: camera down",
        "message_key": "alarm.camera_down",
        "message_args": json.dumps({"station": "st1", "camera": HOSTILE, "reason": {"key": "reason.camera_down"}}),
        "raised_at": T0,
        "cleared_at": T0 + 30,
        "acked_by": "<b>erik</b>",
        "acked_at": T0 + 10,
    }
    with store.engine.begin() as conn:
        conn.execute(alarms_table.insert(), [row])
    store.close()
    return db


@pytest.mark.browser
def test_acknowledged_in_the_live_view_then_listed_with_who_and_when_in_german_too(
    tmp_path,
    browser,  # noqa: F811
    console_factory,
):
    from deploy.console.loadgen import FakeStation

    st = FakeStation("st1")
    try:
        st.heartbeats({"cam1": True})
        rules = '[alarms]\n[[alarms.rules]]\nname = "3 in a row"\nkind = "defects_in_row"\ncount = 3\n'
        con = console_factory(
            [{"name": "st1", "endpoint": st.endpoint}], store=_hostile_row(tmp_path), extra_toml=rules
        )
        wait_for(lambda: con.health()["received"]["status"] > 0, 10, "heartbeat")
        page = login(browser, con.base, "olga")
        for seq in range(3):  # a real station stream raises the alarm
            st.verdict("cam1", seq, "defect")
        page.wait_for_selector("#alarm-banner li.active", timeout=15_000)
        page.click("#alarm-banner button.ack")  # acknowledged in the live view
        page.wait_for_selector("#alarm-banner .acked", timeout=10_000)
        st.verdict("cam1", 3, "ok")  # the condition ends: the alarm leaves the banner
        page.wait_for_selector("#alarm-banner", state="hidden", timeout=10_000)
        for seq in range(4, 7):  # a second alarm, left unacknowledged
            st.verdict("cam1", seq, "defect")
        page.wait_for_selector("#alarm-banner li.active", timeout=15_000)

        page.click("#nav-alarms")
        page.wait_for_selector("body[data-ready='1']")
        rows = page.locator("#alarm-rows tbody tr")
        assert rows.count() == 3
        new, acked, old = rows.nth(0), rows.nth(1), rows.nth(2)  # newest first
        assert new.locator(".state").inner_text() == "open" and new.locator("button.ack").count() == 1
        assert acked.locator(".state").inner_text() == "cleared" and acked.locator(".camera").inner_text() == "cam1"
        assert acked.locator(".message").inner_text() == "st1/cam1: 3 defects in a row"
        who = acked.locator(".acked-cell").inner_text()
        assert who.startswith("acknowledged by olga 20") and "UTC" in who  # who, and when with the zone
        assert "UTC" in acked.locator(".raised").inner_text() and "UTC" in acked.locator(".cleared-at").inner_text()
        assert acked.locator(".rule").inner_text() == "3 in a row (defects in a row)"
        # stored data is shown as text: a hostile camera name, rule name, message argument and user
        assert old.locator(".camera").inner_text() == HOSTILE
        assert old.locator(".message").inner_text() == f"st1/{HOSTILE}: camera down"
        assert old.locator(".acked-cell").inner_text().startswith("acknowledged by <b>erik</b> 2023-11-14 22:13:30 UTC")
        assert page.locator("#alarm-rows img, #alarm-rows b").count() == 0
        assert page.evaluate("() => window.pwned") is None
        assert "page 1 of 1 · 3 alarms" in page.inner_text("#pageinfo")

        heights = page.eval_on_selector_all(
            "header a, #filters select, #filters input, #filters button, #alarm-rows button, .pager button",
            "els => els.map(e => e.getBoundingClientRect().height)",
        )
        assert len(heights) >= 12 and min(heights) >= 44, heights  # touch targets, as on the other pages

        # keyboard only: tab to the acknowledge button and press Enter
        page.focus("#filters button")
        for _ in range(10):
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.classList.contains('ack')"):
                break
        page.keyboard.press("Enter")
        page.wait_for_function("() => !document.querySelector('#alarm-rows button.ack')", timeout=10_000)
        assert rows.nth(0).locator(".acked-cell").inner_text().startswith("acknowledged by olga")
        # filters: nothing unacknowledged is left; the station's camera finds its two alarms
        page.select_option("#filters [name=acked]", "no")
        page.click("#filters button")
        page.wait_for_selector("#none:not([hidden])")
        assert rows.count() == 0
        page.select_option("#filters [name=acked]", "")
        page.fill("#filters [name=camera]", "cam1")
        page.press("#filters [name=camera]", "Enter")
        page.wait_for_function("() => document.querySelectorAll('#alarm-rows tbody tr').length == 2")

        # in German: the same rows, translated texts, the stored names still text
        page.goto(con.base + "/alarms?lang=de")
        page.wait_for_selector("body[data-ready='1']")
        assert page.inner_text("#alarm-rows thead th:first-child") == "Ausgelöst"
        acked, old = rows.nth(1), rows.nth(2)
        assert acked.locator(".message").inner_text() == "st1/cam1: 3 Fehler in Folge"
        assert acked.locator(".acked-cell").inner_text().startswith("quittiert von olga 20")
        assert acked.locator(".state").inner_text() == "beendet"
        assert old.locator(".message").inner_text() == f"st1/{HOSTILE}: Kamera aus"
        assert old.locator(".camera").inner_text() == HOSTILE
        assert page.inner_text("h2.page-title") == "Alarmverlauf"
        assert "Seite 1 von 1 · 3 Alarme" in page.inner_text("#pageinfo")
        assert page.locator("#alarm-rows img, #alarm-rows b").count() == 0
        assert page.evaluate("() => window.pwned") is None
    finally:
        st.close()
