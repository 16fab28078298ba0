"""History, search and the review queue: filters and paging over a real store, and a keyboard-only review in a
real Chromium (marked `browser` there); confirming an UNCERTAIN frame needs its class."""

from __future__ import annotations

import pytest

from deploy.console.loadgen import verdict_message
from deploy.console.store import Store, row_from_message
from tests.deploy.console.conftest import Client
from tests.deploy.console.test_browser import browser, login  # noqa: F401  (the module's Chromium fixture)

PATTERN = ["ok", "uncertain", "ok", "defect", "defect", "defect", "uncertain", "defect"] * 5  # 40 frames


def _seed(tmp_path) -> str:
    import cv2
    import numpy as np

    spool = tmp_path / "spool"
    spool.mkdir()
    db = f"sqlite:///{tmp_path / 'results.db'}"
    store = Store(db, retention_days=0)
    rows = []
    for i, v in enumerate(PATTERN):
        name = f"snap_{i:03d}.jpg"
        cv2.imwrite(str(spool / name), np.full((48, 64, 3), 40 + i, np.uint8))
        msg = verdict_message(
            "st1", "cam1" if i % 2 else "cam2", i, v, captured_at=1_700_000_000.0 + i, snapshot=f"/var/spool/{name}"
        )
        msg["source"] = f"part-{i:04d}"
        rows.append(row_from_message(msg, str(spool / name)))
    store.insert(rows)
    store.close()
    return db


def test_history_filters_paging_and_uncertain_confirm_needs_a_class(tmp_path, console_factory):
    db = _seed(tmp_path)
    con = console_factory(
        [{"name": "st1", "endpoint": "tcp://127.0.0.1:1", "snapshot_dir": str(tmp_path / "spool")}], store=db
    )
    c = Client(con.base)
    assert c.login("olga") == 200
    page = c.json("/api/history?per_page=10")
    assert page["total"] == 40 and len(page["rows"]) == 10 and page["rows"][0]["seq"] == 39  # newest first
    assert c.json("/api/history?per_page=10&page=4")["rows"][-1]["seq"] == 0
    assert c.json("/api/history?verdict=uncertain")["total"] == 10
    assert c.json("/api/history?camera=cam1&verdict=defect")["total"] == 15
    assert c.json(f"/api/history?from={1_700_000_010}&to={1_700_000_020}")["total"] == 10
    # naive times are in the zone the page sends (the line's); 1_700_000_010 is 23:13:30 in Berlin (CET)
    assert c.json("/api/history?from=2023-11-14T23:13:30&tz=Europe/Berlin")["total"] == 30
    assert c.json("/api/history?from=2023-11-14T22:13:30")["total"] == 30  # no tz: UTC
    assert c.get("/api/history?from=2023-11-14T23:13:30&tz=Mars/Base")[0] == 400
    eng = Client(con.base)
    assert eng.login("erik") == 200
    status, body, _ = eng.get("/api/export.csv?from=2023-11-14+23:13:30&tz=Europe/Berlin")
    assert status == 200 and len(body.decode().strip().splitlines()) == 1 + 30
    assert c.get("/api/history?verdict=bogus")[0] == 400 and c.get("/api/history?per_page=100000")[0] == 400
    unc = c.json("/api/history?verdict=uncertain&per_page=1")["rows"][0]
    status, body, _ = c.review(unc["uid"], "confirm")
    assert status == 400 and b"needs the class" in body
    assert c.review(unc["uid"], "confirm", label="defect")[0] == 200
    assert c.json("/api/history?reviewed=yes")["total"] == 1 and c.json("/api/history?reviewed=no")["total"] == 39
    got = c.json(f"/api/verdicts/{unc['uid']}")
    assert (got["review_action"], got["review_label"]) == ("confirm", "defect")


@pytest.mark.browser
def test_review_queue_with_the_keyboard_only(tmp_path, browser, console_factory):  # noqa: F811
    db = _seed(tmp_path)
    con = console_factory(
        [{"name": "st1", "endpoint": "tcp://127.0.0.1:1", "snapshot_dir": str(tmp_path / "spool")}], store=db
    )
    page = login(browser, con.base, "olga", wait_live=False)
    page.goto(con.base + "/history")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#rows tbody tr").count() == 25 and "of 2" in page.inner_text("#pageinfo")
    page.wait_for_function("() => [...document.querySelectorAll('#rows img.thumb')].some(i => i.naturalWidth > 0)")
    classes = page.eval_on_selector_all("#filters [name=class] option", "os => os.map(o => o.value).filter(Boolean)")
    page.keyboard.press("j")  # row 0: seq 39 defect
    assert "part part-0039" in page.inner_text("#d-info") and "model" in page.inner_text("#d-info")
    page.keyboard.press("c")  # confirm; the queue moves to row 1 (seq 38: uncertain)
    page.wait_for_selector('#rows tr[data-i="0"] .rv[data-action="confirm"]')
    page.keyboard.press("c")  # an UNCERTAIN frame: confirm needs the class first
    assert "choose the class" in page.inner_text("#d-msg")
    page.keyboard.press(str(classes.index("defect") + 1))
    page.keyboard.press("c")
    page.wait_for_selector('#rows tr[data-i="1"] .rv[data-action="confirm"]')
    page.keyboard.press("r")  # row 2 (seq 37: defect) rejected: not green
    page.wait_for_selector('#rows tr[data-i="2"] .rv[data-action="reject"]')
    colours = page.eval_on_selector_all("#rows .rv[data-action]", "els => els.map(e => getComputedStyle(e).color)")
    assert colours[0] != colours[2]
    page.keyboard.press(str(classes.index("ok") + 1))
    page.keyboard.press("l")  # row 3 relabelled
    page.wait_for_selector('#rows tr[data-i="3"] .rv[data-action="relabel"]')
    page.keyboard.press("n")  # next page
    page.wait_for_function("() => document.querySelector('#pageinfo').textContent.startsWith('page 2')")
    c = Client(con.base)
    assert c.login("erik") == 200
    done = {r["seq"]: (r["review_action"], r["review_label"]) for r in c.json("/api/history?reviewed=yes")["rows"]}
    assert done == {39: ("confirm", None), 38: ("confirm", "defect"), 37: ("reject", None), 36: ("relabel", "ok")}
