"""A layout for 2 m, measured in a real Chromium at 1920x1080 (marked `browser`): tiles fill the screen for any
camera count, verdict >= 80 px, camera / class / confidence >= 28 px, touch targets >= 44 px, a screenshot
check, the light theme, the German catalogue and the styled 403 page."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tests.deploy.console.test_browser import browser, login  # noqa: F401
from tests.deploy.console.test_browser_signal import Line

pytestmark = pytest.mark.browser

SIZES = """() => {
  const px = (sel) => [...document.querySelectorAll(sel)].map(e => parseFloat(getComputedStyle(e).fontSize));
  const area = (r) => r.width * r.height;
  const box = document.querySelector('#tiles').getBoundingClientRect();
  const tiles = [...document.querySelectorAll('.tile')].map(t => t.getBoundingClientRect());
  const targets = [...document.querySelectorAll('header a:not([hidden]), header button, #alarm-banner button')]
    .filter(e => e.offsetParent !== null).map(e => e.getBoundingClientRect().height);
  return {verdict: px('.tile .verdict'), name: px('.tile h3 .name'), meta: px('.tile .meta'),
          fill: tiles.reduce((s, r) => s + area(r), 0) / area(box),
          inside: tiles.every(r => r.bottom <= innerHeight + 1 && r.right <= innerWidth + 1),
          targets, width: box.width / innerWidth};
}"""


@pytest.mark.parametrize("cameras", [2, 16])
def test_sizes_at_1920x1080_for_any_camera_count(browser, console_factory, tmp_path, cameras):  # noqa: F811
    line = Line([f"cam{i:02d}" for i in range(cameras)])
    try:
        con = console_factory([{"name": "st1", "endpoint": line.st.endpoint}])
        page = login(browser, con.base, "olga")
        page.wait_for_function(
            f"() => document.querySelectorAll('.tile[data-signal=\"live\"]').length == {cameras}", timeout=20_000
        )
        m = page.evaluate(SIZES)
        assert min(m["verdict"]) >= 80 and min(m["name"]) >= 28 and min(m["meta"]) >= 28, m
        assert m["fill"] >= 0.75 and m["inside"] and m["width"] >= 0.7, m  # the tiles fill their area, no scrolling
        assert min(m["targets"]) >= 44, m
        shot = cv2.imdecode(np.frombuffer(page.screenshot(), np.uint8), cv2.IMREAD_COLOR)
        assert shot.shape[:2] == (1080, 1920)
        r = page.locator(".tile .verdict").first.bounding_box()
        word = shot[int(r["y"]) : int(r["y"] + r["height"]), int(r["x"]) : int(r["x"] + r["width"])]
        red = (word[..., 2] > 150) & (word[..., 1] < 90) & (word[..., 0] < 110)  # the DEFECT word, in BGR
        assert red.mean() > 0.03, red.mean()
        cv2.imwrite(str(tmp_path / f"live-{cameras}.png"), shot)
    finally:
        line.close()


def test_light_theme_german_catalogue_and_styled_403(browser, console_factory):  # noqa: F811
    line = Line(["cam1"])
    try:
        con = console_factory([{"name": "st1", "endpoint": line.st.endpoint}])
        page = login(browser, con.base, "olga")
        page.emulate_media(color_scheme="dark")
        dark = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        assert sum(int(v) for v in dark[4:-1].split(",")) < 150  # the dark theme
        page.emulate_media(color_scheme="light")
        light = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        assert dark != light and sum(int(v) for v in light[4:-1].split(",")) > 600  # a light background
        page.goto(con.base + "/?lang=de")
        page.wait_for_selector(".tile[data-signal='live']", timeout=15_000)
        assert page.inner_text("[data-i18n='shift.title']") == "Diese Schicht:"
        assert page.get_attribute("html", "lang") == "de"
        page.goto(con.base + "/history?lang=de")  # every page reads the same catalogue
        page.wait_for_selector("body[data-ready='1']")
        assert page.inner_text("[data-i18n='col.time']") == "Zeit" and "Seite 1" in page.inner_text("#pageinfo")
        resp = page.goto(con.base + "/export")  # an operator may not export: a styled page, not plain text
        assert resp.status == 403
        assert page.locator("body.error-page .code").inner_text() == "403"
        assert "may not export" in page.inner_text("#detail")
        assert page.evaluate("() => getComputedStyle(document.body).display") == "grid"
    finally:
        line.close()
