"""A hostile or broken station against the console, over real ZeroMQ, a real console process and real stores.

Poisoned messages (NaN, 10**20, over-long names) are refused alone and counted; no row of any
other message is lost, on SQLite and on PostgreSQL. Floods are rate-limited per station and
counted; oversized messages are refused before they are parsed; a heartbeat's large `model`
object is never re-sent to browsers.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from deploy.console.loadgen import MODEL, FakeStation, status_message, verdict_message
from deploy.console.store import Store
from runtime.serving.messages import MAX_MESSAGE_BYTES
from tests.deploy.console.conftest import Client, wait_for


def metric(con, name: str, **labels: str) -> float:
    """One sample of the console's /metrics (0 when absent)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(con.base + "/metrics", timeout=5).read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def strict_json(text: str | bytes):
    """JSON as a browser's JSON.parse reads it: NaN / Infinity are syntax errors."""

    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _raw(st: FakeStation, topic: str, msg: dict) -> None:
    """Send as a hostile peer would: Python's json writes NaN / Infinity."""
    st.sock.send_multipart([topic.encode(), json.dumps(msg, allow_nan=True).encode()])


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    url = request.getfixturevalue("postgres")
    import sqlalchemy as sa

    s = Store(url)
    with s.engine.begin() as conn:  # the session-scoped server is shared: start empty
        conn.execute(sa.text("TRUNCATE reviews, verdicts, dead_letters"))
    s.close()
    return url


def _both_up(stations, con) -> None:
    c = Client(con.base)
    assert c.login("olga") == 200

    def up() -> bool:
        for st in stations:
            st.status({"cam1": True})
        return all(s["up"] for s in c.json("/api/state")["stations"])

    wait_for(up, 15, "both stations' heartbeats")


def test_poisoned_messages_lose_no_rows_from_any_station(console_factory, store_url):
    st1, st2 = FakeStation("st1"), FakeStation("st2")
    try:
        con = console_factory(
            [{"name": "st1", "endpoint": st1.endpoint}, {"name": "st2", "endpoint": st2.endpoint}], store=store_url
        )
        _both_up([st1, st2], con)
        poison = [
            verdict_message("st1", "cam1", 900, "defect") | {"confidence": float("nan")},
            verdict_message("st1", "cam1", 901) | {"top_score": float("inf")},
            verdict_message("st1", "cam1", 10**20),
            verdict_message("st1", "cam1", 903, "defect", classes=("ok", "c" * 200)),
            verdict_message("st1", "cam1", 904) | {"captured_at": float("-inf")},
        ]
        for i in range(20):
            st1.verdict("cam1", i, "defect" if i % 3 == 0 else "ok")
            if i < len(poison):
                _raw(st1, "st1.cam1.defect", poison[i])
            st2.verdict("cam1", i, "ok")
        wait_for(lambda: con.health()["recorded"] >= 40, 20, "the 40 good verdicts recorded")
        health = con.health()
        assert health["recorded"] == 40 and health["dead_letters"] == 0
        assert health["received"]["rejected"] == len(poison)
        assert metric(con, "defectscope_console_messages_rejected_total", station="st1", reason="schema") == 5
        store = Store(store_url)
        rows = store.range(0, time.time() + 60)
        store.close()
        assert sorted((r["station"], r["seq"]) for r in rows) == sorted(
            (s, i) for s in ("st1", "st2") for i in range(20)
        )
        c = Client(con.base)
        assert c.login("olga") == 200
        for path in ("/api/state", "/api/events"):
            status, body, _ = c.get(path)
            assert status == 200, (path, status)
            strict_json(body)
    finally:
        st1.close()
        st2.close()


def test_a_flooding_station_is_rate_limited_and_counted(console_factory):
    st = FakeStation("st1")
    try:
        con = console_factory([{"name": "st1", "endpoint": st.endpoint}], station_max_msgs_per_s=20.0)
        wait_for(lambda: (st.status({"cam1": True}), con.health()["received"]["status"] > 0)[1], 10, "heartbeat")
        n = 400
        for i in range(n):
            st.verdict("cam1", i)

        def settled():
            limited = metric(con, "defectscope_console_messages_rejected_total", station="st1", reason="rate_limited")
            return con.health()["recorded"] + limited >= n and limited

        limited = wait_for(settled, 20, "every flood message recorded or refused")
        recorded = con.health()["recorded"]
        assert recorded + limited == n and recorded < n / 2, (recorded, limited)
    finally:
        st.close()


def test_oversized_messages_are_refused_before_parsing_and_the_stream_goes_on(console_factory):
    st = FakeStation("st1")
    try:
        con = console_factory([{"name": "st1", "endpoint": st.endpoint}])
        wait_for(lambda: (st.status({"cam1": True}), con.health()["received"]["status"] > 0)[1], 10, "heartbeat")
        fat = verdict_message("st1", "cam1", 1) | {"pad": ["x" * 4000] * 80}  # 320 KB, each field within limits
        for _ in range(20):
            st.send("st1.cam1.ok", fat)
        st.verdict("cam1", 2)
        wait_for(lambda: con.health()["recorded"] == 1, 10, "the normal verdict after the flood")
        assert metric(con, "defectscope_console_messages_rejected_total", station="st1", reason="too_large") == 20
        assert len(json.dumps(fat)) > MAX_MESSAGE_BYTES
    finally:
        st.close()


def test_a_heartbeats_model_object_is_not_rebroadcast_to_browsers(console_factory):
    from websockets.sync.client import connect

    st = FakeStation("st1")
    try:
        con = console_factory([{"name": "st1", "endpoint": st.endpoint}], kiosk=True)
        wait_for(lambda: (st.status({"cam1": True}), con.health()["received"]["status"] > 0)[1], 10, "heartbeat")
        # Within every schema limit (50 strings of 4,000 characters): accepted, but the page shows name + version.
        fat = status_message("st1", {"cam1": True}) | {"model": MODEL | {f"k{i}": "x" * 4000 for i in range(50)}}
        huge = status_message("st1", {"cam1": True}) | {"model": MODEL | {"blob": "x" * 900_000}}
        got: dict[int, int] = {}
        last: dict[int, dict] = {}
        ready = threading.Barrier(4)

        def browser(k: int) -> None:
            with connect(con.base.replace("http", "ws") + "/ws", origin=con.base, open_timeout=10, max_size=None) as ws:
                strict_json(ws.recv(timeout=10))
                ready.wait(30)
                total, deadline = 0, time.monotonic() + 30
                while time.monotonic() < deadline:
                    text = ws.recv(timeout=30)
                    total += len(text.encode() if isinstance(text, str) else text)
                    msg = strict_json(text)
                    if any(t["last"] and t["last"]["seq"] == 999 for t in msg.get("tiles", [])):
                        last[k] = msg
                        break
                got[k] = total

        threads = [threading.Thread(target=browser, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        ready.wait(30)
        for i in range(10):
            st.send("st1._status", fat)
            st.send("st1._status", huge)
            st.verdict("cam1", i)
        st.send("st1._status", fat)
        st.verdict("cam1", 999)
        for t in threads:
            t.join(60)
        print(f"WebSocket bytes per browser: {sorted(got.values())}")
        assert len(got) == 3 and max(got.values()) < 64 * 1024, got
        assert all(
            m["stations"][0]["model"] == {"name": MODEL["name"], "version": MODEL["version"]} for m in last.values()
        )
        assert metric(con, "defectscope_console_messages_rejected_total", station="st1", reason="too_large") == 10
    finally:
        st.close()


def test_non_finite_values_already_stored_never_break_the_json_api(console_factory, postgres):
    """PostgreSQL stores NaN / Infinity in float columns (rows written before the schema limits)."""
    import sqlalchemy as sa

    from deploy.console.store import row_from_message

    s = Store(postgres)
    with s.engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE reviews, verdicts, dead_letters"))
    row = row_from_message(verdict_message("st1", "cam1", 1, "defect")) | {
        "confidence": float("nan"),
        "top_score": float("inf"),
    }
    assert s.insert([row]) == []
    s.close()
    con = console_factory([{"name": "st1", "endpoint": "tcp://127.0.0.1:1"}], store=postgres)
    eng = Client(con.base)
    assert eng.login("erik") == 200
    for path in ("/api/events", f"/api/verdicts/{row['uid']}", "/api/dataset", "/api/state"):
        status, body, _ = eng.get(path)
        assert status == 200, (path, status, body[:200])
        strict_json(body)
