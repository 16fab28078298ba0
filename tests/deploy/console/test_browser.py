"""The console in a real headless Chromium against real daemons on loopback (marked `browser`).

Full loop: daemon judges frames -> console records them -> an operator reviews defects through the
page -> `defectscope dataset export` -> `defectscope extend` trains on the export.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool  # noqa: F401  (same skip policy as the other system tools)
from tests.deploy.console.conftest import USERS, wait_for
from tests.factories import free_port
from tests.runtime._helpers import make_bundle, make_images, spawn_daemon, station_config, stop

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/lib/chromium/chromium-headless-shell"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} missing although .ci/run installs it")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium chromium-headless-shell)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def login(browser, base: str, user: str, wait_live: bool = True):
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    page.goto(base + "/login")
    page.fill("#user", user)
    page.fill("#password", USERS[user][1])
    page.click("#login-btn")
    page.wait_for_url(base + "/")
    if wait_live:
        page.wait_for_selector("#conn.up", timeout=10_000)
    return page


def daemon(tmp: Path, name: str, pattern: list[str], pub_port: int, loop: bool, fps: float):
    d = tmp / name
    bundle = make_bundle(d / "bundle")
    make_images(d / "replay", pattern)
    spool = d / "spool"
    cfg, _ = station_config(
        d,
        bundle,
        [{"id": "cam1", "source": str(d / "replay"), "loop": loop, "fps": fps}],
        pub_port=pub_port,
        publisher={"wait_for_subscribers": 1, "status_interval_s": 0.2},
        snapshots={"enabled": True, "dir": str(spool), "quota_mb": 50.0},
        daemon={"pid_file": str(d / "daemon.pid"), "exit_when_sources_end": False},
    )
    text = cfg.read_text().replace('station = "st1"', f'station = "{name}"')
    cfg.write_text(text)
    return spool, spawn_daemon(cfg)


def _train_base(run: Path, data: Path) -> None:
    """A tiny_cnn run directory for `extend --from` (tests/training/classification/test_extend.py makes it the same way)."""
    from tests.training.classification.test_extend import _train_base as train

    train(run, data)


def test_live_review_export_extend_loop(tmp_path, browser, console_factory):
    pattern = ["ok", "defect", "defect", "uncertain", "defect"] * 8  # 24 defects, 8 uncertain, 8 ok
    port = free_port()
    spool = tmp_path / "st1" / "spool"
    con = console_factory([{"name": "st1", "endpoint": f"tcp://127.0.0.1:{port}", "snapshot_dir": str(spool)}])
    page = login(browser, con.base, "olga")
    assert page.is_hidden("#nav-export")
    _, proc = daemon(tmp_path, "st1", pattern, port, loop=False, fps=8.0)
    try:
        # the live tile follows the stream: its sequence number advances as frames are judged
        tile = '[data-tile="st1/cam1"]'
        page.wait_for_selector(tile, timeout=30_000)
        first = int(page.wait_for_function(f"() => document.querySelector('{tile}').dataset.seq").json_value())
        page.wait_for_function(f"() => +document.querySelector('{tile}').dataset.seq > {first}", timeout=10_000)
        verdict = page.get_attribute(tile, "data-verdict")
        assert page.inner_text(f"{tile} .verdict") == verdict.upper() and verdict in ("ok", "defect", "uncertain")
        page.wait_for_function(
            f"() => +document.querySelector('{tile}').dataset.seq == {len(pattern) - 1}", timeout=30_000
        )
        # every judged frame is in the store; defect/uncertain events are listed with their thumbnails
        wait_for(lambda: con.health()["recorded"] == len(pattern), 10, "all verdicts recorded")
        page.wait_for_function("() => document.querySelectorAll('#events li.defect').length == 24", timeout=10_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#events li.defect img.thumb')]"
            ".every(i => i.complete && i.naturalWidth > 0)",
            timeout=15_000,
        )
        assert page.locator("#events li.uncertain").count() == 8

        # review through the page: reject 8 defects (false alarms), confirm 8
        uids = page.eval_on_selector_all("#events li.defect", "els => els.map(e => e.dataset.uid)")[:16]
        for i, uid in enumerate(uids):
            page.click(f'#events li[data-uid="{uid}"]')
            page.wait_for_selector("#review[open]")
            page.wait_for_function("() => document.querySelector('#rv-img').naturalWidth > 0")
            page.click("#rv-reject" if i < 8 else "#rv-confirm")
            page.wait_for_selector("#review", state="hidden")
            badge = f'#events li[data-uid="{uid}"] .review-badge'
            page.wait_for_function(f"() => document.querySelector('{badge}').textContent.includes('by olga')")
        page.reload()
        page.wait_for_selector(f'#events li[data-uid="{uids[0]}"]')
        assert page.inner_text(f'#events li[data-uid="{uids[0]}"] .review-badge') == "rejected by olga"
        assert page.inner_text(f'#events li[data-uid="{uids[15]}"] .review-badge') == "confirmed by olga"
    finally:
        code, err = stop(proc)
    assert code == 0, err[-2000:]

    # export -> ImageFolder with provenance; the rejected frames are "ok" examples
    from deploy.console.dataset import main as dataset_main

    out = tmp_path / "dataset"
    assert dataset_main(["export", "--from-console", str(tmp_path / "results.db"), "--out", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["classes"] == {"defect": 8, "ok": 8} and prov["stations"] == ["st1"]
    assert prov["model_versions"] == ["tiny@1.0.0"] and prov["reviewers"] == ["olga"]
    rejected = {i["uid"] for i in prov["items"] if i["label"] == "ok"}
    assert rejected == set(uids[:8]) and len(list((out / "ok").glob("*.jpg"))) == 8

    # and `defectscope extend` trains on it directly
    pytest.importorskip("torch")
    from tests.training.conftest import write_folder
    from training.classification.extend_cli import main as extend_main

    base = tmp_path / "runA"
    _train_base(base, write_folder(tmp_path / "lineA", {"ok": 24, "defect": 24}))
    rc = extend_main(
        [
            "--from",
            str(base),
            "--data",
            str(out),
            "--out",
            str(tmp_path / "runB"),
            "--val-fraction",
            "0.25",
            "--test-fraction",
            "0.25",
            "--quiet",
            "--threads",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--fisher-samples",
            "8",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "runB" / "report.json").read_text())
    assert report["new_task"] and (tmp_path / "runB" / "best.safetensors").is_file()


def test_operator_cannot_reach_export_but_engineer_can(tmp_path, browser, console_factory):
    con = console_factory([{"name": "st1", "endpoint": f"tcp://127.0.0.1:{free_port()}"}])
    op = login(browser, con.base, "olga")
    assert op.is_hidden("#nav-export")
    resp = op.goto(con.base + "/export")
    assert resp.status == 403 and "export" in op.content()
    eng = login(browser, con.base, "erik")
    eng.click("#nav-export")
    eng.wait_for_selector("#export-title")
    with eng.expect_download() as dl:
        eng.click("#csv-form button")
    assert Path(dl.value.path()).read_text().startswith("station,camera,captured_at_utc")
    # a tablet in portrait: tiles and the event list stack in one column; a 1080p monitor has two
    cols = "() => getComputedStyle(document.querySelector('main')).gridTemplateColumns.split(' ').length"
    assert op.goto(con.base + "/").status == 200 and op.evaluate(cols) == 2
    op.set_viewport_size({"width": 800, "height": 1280})
    assert op.evaluate(cols) == 1


def test_second_station_shows_up_when_its_daemon_starts_and_goes_down_when_it_stops(tmp_path, browser, console_factory):
    p1, p2 = free_port(), free_port()
    con = console_factory(
        [{"name": "st1", "endpoint": f"tcp://127.0.0.1:{p1}"}, {"name": "st2", "endpoint": f"tcp://127.0.0.1:{p2}"}]
    )
    page = login(browser, con.base, "olga")
    page.wait_for_selector('[data-station="st2"][data-up="0"]')
    assert page.locator('[data-tile^="st2/"]').count() == 0
    _, proc = daemon(tmp_path, "st2", ["ok", "defect"], p2, loop=True, fps=2.0)
    try:
        page.wait_for_selector('[data-station="st2"][data-up="1"]', timeout=30_000)
        page.wait_for_selector('[data-tile="st2/cam1"][data-up="1"]', timeout=10_000)
    finally:
        code, err = stop(proc)
    assert code == 0, err[-2000:]
    t0 = time.monotonic()
    page.wait_for_selector('[data-station="st2"][data-up="0"]', timeout=10_000)
    page.wait_for_selector('[data-tile="st2/cam1"][data-up="0"]', timeout=5_000)
    assert time.monotonic() - t0 < 10
    # never the last verdict in its colour: NO SIGNAL with the reason
    assert page.get_attribute('[data-tile="st2/cam1"]', "data-verdict") is None
    assert page.inner_text('[data-tile="st2/cam1"] .verdict') == "NO SIGNAL"
    assert "daemon" in page.inner_text('[data-tile="st2/cam1"] .reason')
    assert page.locator('[data-station="st1"][data-up="0"]').count() == 1


def test_detector_box_is_drawn_and_adjusted_in_the_page(tmp_path, browser, console_factory):
    import cv2
    import numpy as np

    from deploy.console.loadgen import FakeStation
    from tests.deploy.console.conftest import Client

    spool = tmp_path / "spool"
    spool.mkdir()
    st = FakeStation("st1")
    try:
        con = console_factory([{"name": "st1", "endpoint": st.endpoint, "snapshot_dir": str(spool)}])
        page = login(browser, con.base, "olga")
        st.heartbeats({"cam1": True})  # the tile stays live (and shows its boxes) while the station is heard
        wait_for(lambda: con.health()["received"]["status"] > 0, 10, "heartbeat")
        name = "20240101T000000.000000Z_st1_cam1_000000001_defect.jpg"
        cv2.imwrite(str(spool / name), np.full((480, 640, 3), 100, np.uint8))
        st.verdict(
            "cam1",
            1,
            "defect",
            snapshot=f"/var/spool/defectscope/{name}",
            task="detection",
            detections=[{"box": [10, 10, 50, 50], "score": 0.9, "class": "defect"}],
        )
        page.wait_for_selector('[data-tile="st1/cam1"] svg rect.box')  # the detector's box on the live tile
        page.click("#events li")
        page.wait_for_selector("#review[open]")
        page.wait_for_function("() => document.querySelector('#rv-img').naturalWidth > 0")
        assert page.locator("#rv-boxes rect.box").count() == 1
        page.click("#rv-clear")
        r = page.locator("#rv-img").bounding_box()
        sx, sy = r["width"] / 640, r["height"] / 480
        page.mouse.move(r["x"] + 100 * sx, r["y"] + 120 * sy)
        page.mouse.down()
        page.mouse.move(r["x"] + 300 * sx, r["y"] + 360 * sy, steps=5)
        page.mouse.up()
        assert page.locator("#rv-boxes rect.box").count() == 1
        page.click("#rv-relabel")
        page.wait_for_selector("#review", state="hidden")
        c = Client(con.base)
        assert c.login("olga") == 200
        uid = c.json("/api/events")[0]["uid"]
        got = c.json(f"/api/verdicts/{uid}")
        assert got["review_action"] == "relabel" and got["review_user"] == "olga"
        (box,) = got["review_boxes"]
        assert box["class"] == got["review_label"]
        assert all(abs(a - b) <= 3 for a, b in zip(box["box"], [100, 120, 300, 360])), box
    finally:
        st.close()
