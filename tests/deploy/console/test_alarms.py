"""Alarms: rules over real verdict streams, history in a real SQLite store, and the webhook to a real local
HTTP receiver (HMAC-signed)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deploy.console.alarm_rules import AlarmConfig, AlarmConfigError, Rule, parse
from deploy.console.alarms import Alarms
from deploy.console.config import from_dict
from deploy.console.live import Live
from deploy.console.loadgen import FakeStation, status_message, verdict_message
from deploy.console.store import Store
from tests.deploy.console.conftest import Client, wait_for


def _engine(tmp_path, *rules: Rule) -> tuple[Alarms, Store, list]:
    store = Store(str(tmp_path / "results.db"), retention_days=0)
    live = Live(from_dict({"stations": [{"name": "st1", "endpoint": "tcp://a:1"}], "server": {"down_after_s": 3.0}}))
    events: list = []
    alarms = Alarms(AlarmConfig(rules=rules), store.engine, live, lambda e, a: events.append((e, a and a.id)))
    return alarms, store, events


def test_defects_in_row_raise_once_until_acknowledged_and_history_keeps_who(tmp_path):
    alarms, store, events = _engine(tmp_path, Rule("three", "defects_in_row", camera="cam1", count=3))
    for seq, v in enumerate(["defect", "defect", "ok", "defect", "defect"]):
        alarms.on_verdict(verdict_message("st1", "cam1", seq, v), now=100.0 + seq)
    assert not alarms.views()
    alarms.on_verdict(verdict_message("st1", "cam1", 9, "defect"), now=110.0)
    (a,) = alarms.views()
    assert a["active"] and a["message"] == "st1/cam1: 3 defects in a row" and a["raised_at"] == 110.0
    alarms.on_verdict(verdict_message("st1", "cam2", 1, "defect"), now=110.5)  # another camera: not this rule
    for seq in range(3):  # flapping before the acknowledge: the same alarm, no new rows
        alarms.on_verdict(verdict_message("st1", "cam1", 10 + 2 * seq, "ok"), now=111.0 + seq)
        for k in range(3):
            alarms.on_verdict(verdict_message("st1", "cam1", 20 + k, "defect"), now=111.5 + seq)
    assert len(alarms.history()) == 1
    assert alarms.ack(a["id"], "olga", now=120.0) is not None
    assert alarms.views()[0]["acked_by"] == "olga"  # still active: shown until it clears
    alarms.on_verdict(verdict_message("st1", "cam1", 30, "ok"), now=121.0)
    assert alarms.views() == []
    (row,) = alarms.history()
    assert (row["acked_by"], row["acked_at"], row["cleared_at"]) == ("olga", 120.0, 121.0)
    assert [e for e, _ in events][:2] == ["raised", "cleared"] and events[-1][0] == "cleared"
    store.close()


def test_rate_rules_need_min_frames_and_count_uncertain_separately(tmp_path):
    alarms, store, _ = _engine(
        tmp_path,
        Rule("unc", "uncertain_rate", threshold=0.25, window_s=10, min_frames=8),
        Rule("def", "defect_rate", threshold=0.5, window_s=10, min_frames=8),
    )
    for i in range(7):
        alarms.on_verdict(verdict_message("st1", "cam1", i, "uncertain"), now=100.0 + i * 0.1)
    assert not alarms.views()  # fewer frames than min_frames
    alarms.on_verdict(verdict_message("st1", "cam1", 7, "ok"), now=100.8)
    (a,) = alarms.views()
    assert a["rule"] == "unc" and "uncertain rate 88%" in a["message"]
    for i in range(40):  # the window slides: old uncertain frames leave it
        alarms.on_verdict(verdict_message("st1", "cam1", 10 + i, "ok"), now=112.0 + i * 0.1)
    assert not alarms.views()[0]["active"]
    store.close()


def test_model_fallback_and_station_down_and_reload_after_restart(tmp_path):
    alarms, store, _ = _engine(tmp_path, Rule("fallback", "model_fallback"), Rule("down", "station_down", for_s=2.0))
    hb = status_message("st1", {"cam1": True})
    hb["model"]["boot_fallback"] = "bundle 2.0 refused: signature"
    alarms.live.on_status(hb, now=10.0)
    alarms.on_status(hb, now=1000.0)
    alarms.tick(now=1000.0, mono=10.0)
    assert [a["message"] for a in alarms.views()] == ["st1: model fallback: bundle 2.0 refused: signature"]
    alarms.tick(now=1005.0, mono=15.0)  # no heartbeat for 5 s: down, but not yet for for_s
    assert len(alarms.views()) == 1
    alarms.tick(now=1007.5, mono=17.5)
    assert {a["rule"] for a in alarms.views()} == {"fallback", "down"}
    again = Alarms(alarms.cfg, store.engine, alarms.live)  # a console restart: unacknowledged alarms stay
    assert {a["rule"] for a in again.views()} == {"fallback", "down"}
    assert all(not a["active"] for a in again.views())
    store.close()


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"rules": [{"name": "x", "kind": "nope"}]}, "alarms.rules[0].kind"),
        ({"rules": [{"name": "x", "kind": "defect_rate", "threshold": 2}]}, "alarms.rules[0].threshold"),
        ({"rules": [{"name": "x", "kind": "defects_in_row", "count": 0}]}, "alarms.rules[0].count"),
        ({"webhook_urls": ["ftp://x"]}, "alarms.webhook_urls"),
        ({"bogus": 1}, "alarms.bogus"),
    ],
)
def test_alarm_config_errors_name_the_key(tmp_path, bad, key):
    with pytest.raises(AlarmConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse(bad, "c.toml", tmp_path)


class Receiver:
    """A real HTTP server on loopback that keeps every POST body and its signature header."""

    def __init__(self) -> None:
        got = self.got = []

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                got.append((body, self.headers.get("X-DefectScope-Signature")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alarms"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alarm_toml(url: str, secret_file: str, repeat_s: float = 1.0) -> str:
    return (
        f'[alarms]\nsound = true\nwebhook_urls = ["{url}"]\nwebhook_secret_file = "{secret_file}"\n'
        f"webhook_repeat_s = {repeat_s}\n\n"
        '[[alarms.rules]]\nname = "3 in a row"\nkind = "defects_in_row"\ncount = 3\n'
    )


def test_webhook_posts_signed_alarm_state_and_the_acknowledge(tmp_path, console_factory):
    secret = tmp_path / "alarm.key"
    secret.write_bytes(b"s3cret-key\n")
    rx = Receiver()
    st = FakeStation("st1")
    try:
        st.heartbeats({"cam1": True})
        con = console_factory([{"name": "st1", "endpoint": st.endpoint}], extra_toml=alarm_toml(rx.url, str(secret)))
        wait_for(lambda: con.health()["received"]["status"] > 0, 10, "heartbeat")
        for seq in range(3):
            st.verdict("cam1", seq, "defect")

        def raised():
            return [json.loads(b) for b, _ in rx.got if json.loads(b)["event"] == "raised"]

        (msg,) = wait_for(raised, 10, "the raised alarm at the receiver")
        assert msg["active"] and msg["unacknowledged"] and msg["alarm"]["message"] == "st1/cam1: 3 defects in a row"
        for body, sig in rx.got:
            assert sig == "sha256=" + hmac.new(b"s3cret-key", body, hashlib.sha256).hexdigest()
        olga = Client(con.base)
        assert olga.login("olga") == 200
        alarm_id = olga.json("/api/alarms")["open"][0]["id"]
        status, _, _ = olga.request(
            "POST", f"/api/alarms/{alarm_id}/ack", b"", {"origin": olga.base, "x-csrf-token": "forged"}
        )
        assert status == 403
        status, _, _ = olga.request(
            "POST", f"/api/alarms/{alarm_id}/ack", b"", {"origin": olga.base, "x-csrf-token": olga.csrf}
        )
        assert status == 200
        acked = wait_for(
            lambda: [json.loads(b) for b, _ in rx.got if json.loads(b)["event"] == "acknowledged"],
            10,
            "the acknowledge at the receiver",
        )
        assert acked[0]["alarm"]["acked_by"] == "olga" and not acked[0]["unacknowledged"]
        metrics = olga.get("/metrics")[1].decode()
        for line in (
            'defectscope_console_alarm_events_total{event="raised"} 1.0',
            'defectscope_console_alarm_events_total{event="acknowledged"} 1.0',
            "defectscope_console_alarms_open 1.0",
            "defectscope_console_alarms_unacknowledged 0.0",
            "defectscope_console_alarm_webhook_failed_total 0.0",
        ):
            assert line in metrics, line
        # repeats carry the whole state, so a receiver that missed an event is right again
        n = len(rx.got)
        wait_for(lambda: len(rx.got) > n + 1, 10, "periodic state posts")
        assert json.loads(rx.got[-1][0])["event"] == "state"
    finally:
        st.close()
        rx.close()


def test_an_unreachable_webhook_is_counted_and_never_blocks_the_console(tmp_path, console_factory):
    from tests.factories import free_port

    secret = tmp_path / "alarm.key"
    secret.write_text("k")
    st = FakeStation("st1")
    try:
        st.heartbeats({"cam1": True})
        con = console_factory(
            [{"name": "st1", "endpoint": st.endpoint}],
            extra_toml=alarm_toml(f"http://127.0.0.1:{free_port()}/alarms", str(secret)),
        )
        wait_for(lambda: con.health()["received"]["status"] > 0, 10, "heartbeat")
        for seq in range(3):
            st.verdict("cam1", seq, "defect")
        olga = Client(con.base)
        assert olga.login("olga") == 200
        wait_for(
            lambda: "defectscope_console_alarm_webhook_failed_total 0.0" not in olga.get("/metrics")[1].decode(),
            15,
            "a failed post counted",
        )
        assert olga.json("/api/alarms")["open"][0]["active"]  # the alarm itself is unaffected
        st.verdict("cam1", 4, "ok")
        wait_for(lambda: con.health()["recorded"] == 4, 10, "verdicts still recorded")
    finally:
        st.close()
