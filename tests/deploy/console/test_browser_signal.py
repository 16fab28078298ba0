"""Never stale, in a real Chromium (marked `browser`): a camera, the daemon and the console each stop and come
back; the tile shows NO SIGNAL / STALE with the reason, never its last verdict in its colour; a removed camera's
tile disappears; an ended session goes to the login page."""

from __future__ import annotations

import threading

import pytest

from deploy.console.loadgen import FakeStation
from tests.deploy.console.conftest import ConsoleProc
from tests.deploy.console.test_browser import browser, login  # noqa: F401  (the module's Chromium fixture)
from tests.deploy.console.test_users import cli

pytestmark = pytest.mark.browser


class Line:
    """A fake station: heartbeats from a thread, and a verdict every 0.1 s for each camera in ``active``."""

    def __init__(self, cameras: list[str]) -> None:
        self.st = FakeStation("st1")
        self.active = set(cameras)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.st.heartbeats(dict.fromkeys(cameras, True))
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            with self.lock:
                cams = sorted(self.active)
            for cam in cams:
                self.st.verdict(cam, seq, "defect")
            seq += 1
            self.stop.wait(0.1)

    def set(self, camera: str, up: bool) -> None:
        with self.lock:
            self.st.cameras = {**self.st.cameras, camera: up}
            (self.active.add if up else self.active.discard)(camera)

    def close(self) -> None:
        self.stop.set()
        self.st.close()


def _tile(cam: str, signal: str | None = None) -> str:
    return f'[data-tile="st1/{cam}"]' + (f'[data-signal="{signal}"]' if signal else "")


def _no_colour(page, cam: str, word: str, reason: str) -> None:
    assert page.get_attribute(_tile(cam), "data-verdict") is None  # no verdict colour
    assert page.inner_text(f"{_tile(cam)} .verdict") == word
    assert reason in page.inner_text(f"{_tile(cam)} .reason")


def test_camera_daemon_and_console_each_stop_and_come_back(browser, console_factory):  # noqa: F811
    line = Line(["cam1", "cam2", "cam3"])
    again = None
    try:
        con = console_factory([{"name": "st1", "endpoint": line.st.endpoint}], stale_after_s=2.0)
        page = login(browser, con.base, "olga")
        page.wait_for_selector(_tile("cam1", "live") + '[data-verdict="defect"]', timeout=15_000)
        page.wait_for_selector(_tile("cam2", "live"))
        assert page.is_hidden("#feed-banner")
        assert "s ago" in page.inner_text(f"{_tile('cam1')} .age")

        # a camera stops: its heartbeat says down and its verdicts stop
        line.set("cam2", False)
        page.wait_for_selector(_tile("cam2", "no_signal"), timeout=10_000)
        _no_colour(page, "cam2", "NO SIGNAL", "camera down: no frame")
        line.set("cam2", True)
        page.wait_for_selector(_tile("cam2", "live") + '[data-verdict="defect"]', timeout=10_000)

        # a camera that is up but sends nothing: STALE past stale_after_s
        with line.lock:
            line.active.discard("cam1")
        page.wait_for_selector(_tile("cam1", "stale"), timeout=10_000)
        _no_colour(page, "cam1", "STALE", "no verdict for")
        with line.lock:
            line.active.add("cam1")
        page.wait_for_selector(_tile("cam1", "live"), timeout=10_000)

        # a camera the station no longer has (gone from its config: no heartbeat entry, no verdicts) disappears
        with line.lock:
            line.active.discard("cam3")
            line.st.cameras = {k: v for k, v in line.st.cameras.items() if k != "cam3"}
        page.wait_for_selector(_tile("cam3"), state="detached", timeout=10_000)

        # the daemon stops: no heartbeat, no verdicts
        line.st.stop_heartbeats()
        with line.lock:
            line.active.clear()
        page.wait_for_selector(_tile("cam1", "no_signal"), timeout=10_000)
        _no_colour(page, "cam1", "NO SIGNAL", "daemon down: no heartbeat")
        with line.lock:
            line.active.update(["cam1", "cam2"])
        line.st.heartbeats(line.st.cameras)
        page.wait_for_selector(_tile("cam1", "live"), timeout=10_000)

        # the console stops: a page-wide banner and every tile says the feed is lost
        cfg = next(a for a in con.proc.args if str(a).endswith(".toml"))
        port = int(con.base.rsplit(":", 1)[1])
        con.stop()
        page.wait_for_selector("#feed-banner", state="visible", timeout=10_000)
        page.wait_for_selector(_tile("cam1", "no_signal"), timeout=5_000)
        _no_colour(page, "cam1", "NO SIGNAL", "console feed lost")
        again = ConsoleProc(cfg, port)  # the session is in the database: the page picks up again by itself
        page.wait_for_selector("#feed-banner", state="hidden", timeout=30_000)
        page.wait_for_selector(_tile("cam1", "live") + '[data-verdict="defect"]', timeout=10_000)
        assert page.url == con.base + "/"
    finally:
        if again is not None:
            again.stop()
        line.close()


def test_an_ended_session_sends_the_page_to_login(browser, console_factory):  # noqa: F811
    line = Line(["cam1"])
    try:
        con = console_factory([{"name": "st1", "endpoint": line.st.endpoint}])
        page = login(browser, con.base, "olga")
        cfg = next(a for a in con.proc.args if str(a).endswith(".toml"))
        assert cli("console", "user", "disable", "olga", "--config", str(cfg)).returncode == 0
        page.wait_for_url(con.base + "/login", timeout=15_000)
    finally:
        line.close()


def test_alarm_banner_acknowledge_is_stored_with_who(browser, console_factory, tmp_path):  # noqa: F811
    from tests.deploy.console.conftest import Client
    from tests.deploy.console.test_alarms import Receiver, alarm_toml

    secret = tmp_path / "alarm.key"
    secret.write_text("k")
    rx = Receiver()
    line = Line(["cam1"])
    try:
        con = console_factory(
            [{"name": "st1", "endpoint": line.st.endpoint}], extra_toml=alarm_toml(rx.url, str(secret), repeat_s=60.0)
        )
        page = login(browser, con.base, "olga")
        page.wait_for_selector("#alarm-banner li.active", timeout=15_000)  # every frame is a defect
        assert "3 defects in a row" in page.inner_text("#alarm-banner")
        page.click("#alarm-banner button.ack")
        page.wait_for_selector("#alarm-banner .acked", timeout=10_000)
        assert "acknowledged by olga" in page.inner_text("#alarm-banner")
        line.stop.set()  # the condition ends only with a non-defect verdict
        line.st.verdict("cam1", 10**6, "ok")
        page.wait_for_selector("#alarm-banner", state="hidden", timeout=10_000)
        c = Client(con.base)
        assert c.login("erik") == 200
        (row,) = c.json("/api/alarms")["history"]
        assert row["acked_by"] == "olga" and row["acked_at"] >= row["raised_at"] and row["cleared_at"]
    finally:
        line.close()
        rx.close()
