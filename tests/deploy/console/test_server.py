"""The console over real HTTP and real ZeroMQ: access control, CSRF, review, CSV, snapshots, stream checks."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import time

import cv2
import numpy as np
import pytest

from deploy.console.loadgen import FakeStation
from deploy.console.store import Store
from runtime.serving.preview import PreviewConfig, PreviewEncoder
from tests.deploy.console.conftest import Client, wait_for


def _jpeg(level: int = 200, size=(48, 64)) -> bytes:
    return cv2.imencode(".jpg", np.full((*size, 3), level, np.uint8))[1].tobytes()


@pytest.fixture
def rig(tmp_path, console_factory):
    spool = tmp_path / "spool"
    spool.mkdir()
    st = FakeStation("st1")
    con = console_factory([{"name": "st1", "endpoint": st.endpoint, "snapshot_dir": str(spool)}])
    yield st, con, spool, tmp_path
    st.close()


def _publish_until_seen(st, con, n_before=0, **kw):
    """PUB/SUB joins asynchronously: send heartbeats until the console has one, then the verdicts."""
    wait_for(lambda: (st.status({"cam1": True}), con.health()["received"]["status"] > 0)[1], 10, "first heartbeat")


def test_login_roles_cookie_flags_and_csrf(rig):
    st, con, spool, _ = rig
    anon = Client(con.base)
    assert anon.get("/")[0] == 303 and anon.get("/api/state")[0] == 401 and anon.get("/api/export.csv")[0] == 401
    assert anon.login("olga", "wrong-password") == 401
    assert anon.login("nobody", "x") == 401
    op = Client(con.base)
    form = b"user=olga&password=olga-pass-1"
    status, _, headers = op.request("POST", "/login", form, {"content-type": "application/x-www-form-urlencoded"})
    cookie = headers.get("set-cookie")
    assert status == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    # a login form posted from another site is refused (login CSRF)
    evil = Client(con.base)
    assert (
        evil.request(
            "POST",
            "/login",
            form,
            {"content-type": "application/x-www-form-urlencoded", "origin": "http://evil.example"},
        )[0]
        == 403
    )
    assert op.login("olga") == 200
    me = op.json("/api/me")
    assert me["role"] == "operator" and "review" in me["can"] and "export" not in me["can"]
    assert op.get("/export")[0] == 403 and op.get("/api/export.csv")[0] == 403 and op.get("/api/dataset")[0] == 403
    headers = op.get("/")[2]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]

    _publish_until_seen(st, con)
    st.verdict("cam1", 1, "defect", snapshot="/var/spool/defectscope/a.jpg")
    uid = wait_for(lambda: [e["uid"] for e in op.json("/api/events")], 10, "event in the store")[0]
    assert op.review(uid, "reject", csrf=None)[0] == 403  # no token
    assert op.review(uid, "reject", csrf="forged")[0] == 403
    assert op.review(uid, "reject", origin="http://evil.example")[0] == 403
    assert op.review(uid, "explode")[0] == 400
    assert op.review(uid, "relabel", label="../../etc")[0] == 400
    assert op.review("0" * 32, "confirm")[0] == 404
    status, body, _ = op.review(uid, "reject")
    assert status == 200, body
    got = op.json(f"/api/verdicts/{uid}")
    assert got["review_action"] == "reject" and got["review_user"] == "olga"
    assert got["reviews"][0]["role"] == "operator" and abs(got["reviews"][0]["created_at"] - time.time()) < 30
    # logout needs the CSRF token, then the session is gone
    assert op.request("POST", "/logout", b"csrf=bad", {"content-type": "application/x-www-form-urlencoded"})[0] == 403
    assert (
        op.request(
            "POST", "/logout", f"csrf={op.csrf}".encode(), {"content-type": "application/x-www-form-urlencoded"}
        )[0]
        == 303
    )
    assert op.get("/api/me")[0] == 401


def test_engineer_csv_export_for_a_time_range_and_rates(rig):
    st, con, _, _ = rig
    _publish_until_seen(st, con)
    t = time.time()
    st.verdict("cam1", 1, "ok", captured_at=t - 7200)  # two hours ago: outside the range below
    for i in range(2, 6):
        st.verdict("cam1", i, "defect" if i % 2 else "ok", captured_at=t - 10 + i)
    st.verdict("cam2", 9, "uncertain", captured_at=t - 1)
    eng = Client(con.base)
    assert eng.login("erik") == 200
    wait_for(lambda: con.health()["recorded"] >= 6, 10, "6 verdicts recorded")
    status, body, headers = eng.get(f"/api/export.csv?from={t - 3600}&to={t + 60}")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [int(r["seq"]) for r in rows] == [2, 3, 4, 5, 9]
    assert rows[0]["source"] == "part-00000002" and rows[0]["model_version"] == "1.2.0"
    assert {r["verdict"] for r in rows} == {"ok", "defect", "uncertain"} and rows[1]["class"] == "defect"
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t - 3600))
    assert len(list(csv.DictReader(io.StringIO(eng.get(f"/api/export.csv?from={iso}")[1].decode())))) == 5
    assert eng.get("/api/export.csv?from=yesterday")[0] == 400
    assert eng.get("/api/events?limit=abc")[0] == 400 and eng.get("/api/events?limit=100000")[0] == 400
    assert eng.get("/api/rates?hours=nan")[0] == 400 and eng.get("/api/rates?hours=-1")[0] == 400
    rates = {(c["station"], c["camera"]): c for c in eng.json("/api/rates?hours=1")["cameras"]}
    assert rates[("st1", "cam1")]["total"] == 4 and rates[("st1", "cam1")]["defect_rate"] == 0.5
    assert eng.get("/export")[0] == 200


def test_snapshots_are_read_only_and_path_confined(rig):
    st, con, spool, tmp = rig
    (spool / "20240101T000000.000000Z_st1_cam1_000000001_defect.jpg").write_bytes(_jpeg())
    secret = tmp / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 top secret")
    os.symlink(secret, spool / "link.jpg")
    (spool / "huge.jpg").write_bytes(b"\xff\xd8" + b"0" * (8 * 1024 * 1024 + 10))
    os.mkfifo(spool / "fifo.jpg")
    c = Client(con.base)
    assert c.get("/snapshots/st1/20240101T000000.000000Z_st1_cam1_000000001_defect.jpg")[0] == 401
    assert c.login("olga") == 200
    status, body, headers = c.get("/snapshots/st1/20240101T000000.000000Z_st1_cam1_000000001_defect.jpg")
    assert status == 200 and body[:2] == b"\xff\xd8" and headers["content-type"] == "image/jpeg"
    assert c.get("/snapshots/st1/link.jpg")[0] == 403  # a planted symlink is not followed
    assert c.get("/snapshots/st1/huge.jpg")[0] == 413
    assert c.get("/snapshots/st1/fifo.jpg")[0] == 403
    for bad in (
        "..%2Fsecret.jpg",
        "%2E%2E%2Fsecret.jpg",
        "..%5Csecret.jpg",
        ".hidden.jpg",
        "x.jpg%00.png",
        "%2Fetc%2Fpasswd",
        "a..jpg",
    ):
        status, body, _ = c.get(f"/snapshots/st1/{bad}")
        assert status in (400, 404), (bad, status)
        assert b"top secret" not in body
    assert c.get("/snapshots/nosuch/x.jpg")[0] == 404
    assert c.get("/snapshots/st1/../../secret.jpg")[0] == 404  # normalised away by the client/router
    assert c.request("PUT", "/snapshots/st1/x.jpg", b"data")[0] == 405


def test_forged_and_malformed_messages_are_rejected_and_counts_match(rig):
    st, con, _, tmp = rig
    _publish_until_seen(st, con)
    from deploy.console.loadgen import verdict_message

    forged = verdict_message("st2", "cam1", 1, "defect")  # another station's name on st1's stream
    st.send("st1.cam1.defect", forged)
    st.send("st1.cam1.ok", {"schema_version": 1, "type": "verdict"})
    st.sock.send_multipart([b"st1.cam1.ok", b"{not json"])
    st.sock.send_multipart([b"st1.cam1.ok", b"a", b"b"])
    for i in range(200):
        st.verdict("cam1", i, "ok")
    wait_for(lambda: con.health()["recorded"] == 200, 10, "200 verdicts recorded")
    assert con.health()["received"]["rejected"] == 4
    store = Store(f"sqlite:///{tmp / 'results.db'}")
    assert store.count() == 200
    assert {r["station"] for r in store.range(0, time.time() + 10)} == {"st1"}


def test_preview_topic_reaches_the_tile(rig):
    st, con, _, _ = rig
    _publish_until_seen(st, con)
    enc = PreviewEncoder(PreviewConfig(enabled=True, max_fps=30.0), "st1")
    topic, msg = enc.offer("cam1", np.full((480, 640, 3), 90, np.uint8), 7, time.time())
    st.send(topic, msg)
    bad = dict(msg, jpeg=base64.b64encode(b"not a jpeg").decode())
    st.send(topic, bad)
    c = Client(con.base)
    assert c.login("olga") == 200
    wait_for(lambda: c.get("/preview/st1/cam1.jpg")[0] == 200, 10, "preview served")
    body = c.get("/preview/st1/cam1.jpg")[1]
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape[1] == 320
    assert con.health()["received"]["rejected"] == 1
    tile = next(t for t in c.json("/api/state")["tiles"] if t["id"] == "st1/cam1")
    assert tile["preview_seq"] == 1


def test_kiosk_is_read_only(tmp_path, console_factory):
    st = FakeStation("st1")
    try:
        con = console_factory([{"name": "st1", "endpoint": st.endpoint}], kiosk=True)
        k = Client(con.base)
        assert k.get("/")[0] == 200
        me = k.json("/api/me")
        assert me["kiosk"] and me["can"] == ["view"]
        _publish_until_seen(st, con)
        st.verdict("cam1", 1, "defect")
        uid = wait_for(lambda: [e["uid"] for e in k.json("/api/events")], 10, "event")[0]
        assert k.review(uid, "reject", csrf=None)[0] == 403
        assert k.get("/api/export.csv")[0] == 403 and k.get("/export")[0] == 403
    finally:
        st.close()


def test_curve_encrypted_station_stream(tmp_path, console_factory):
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    keys = tmp_path / "keys"
    keys.mkdir()
    srv_pub, srv_sec = zmq.auth.create_certificates(keys, "station")
    cli_pub, cli_sec = zmq.auth.create_certificates(keys, "console")
    os.chmod(cli_sec, 0o600)  # a group/other-readable secret key is refused (test_console_security.py)
    spub, ssec = zmq.auth.load_certificate(srv_sec)
    st = FakeStation.__new__(FakeStation)
    import threading

    import zmq as _zmq

    st.name, st.sent, st._lock, st._beating = "st1", 0, threading.Lock(), None
    st.ctx = _zmq.Context()
    auth = ThreadAuthenticator(st.ctx)
    auth.start()
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "console.key").write_bytes(open(cli_pub, "rb").read())
    auth.configure_curve(domain="*", location=str(allowed))
    st.sock = st.ctx.socket(_zmq.PUB)
    st.sock.setsockopt(_zmq.LINGER, 0)
    st.sock.curve_secretkey, st.sock.curve_publickey, st.sock.curve_server = ssec, spub, True
    st.sock.bind("tcp://127.0.0.1:0")
    st.endpoint = st.sock.getsockopt_string(_zmq.LAST_ENDPOINT)
    try:
        con = console_factory(
            [
                {
                    "name": "st1",
                    "endpoint": st.endpoint,
                    "curve": {"server_public_key": str(srv_pub), "client_secret_key": str(cli_sec)},
                }
            ]
        )
        _publish_until_seen(st, con)
        st.verdict("cam1", 1, "ok")
        wait_for(lambda: con.health()["recorded"] == 1, 10, "encrypted verdict recorded")
    finally:
        st.sock.close(0)
        auth.stop()
        st.ctx.term()


def test_websocket_needs_a_session_and_the_console_origin(rig):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    st, con, _, _ = rig
    ws_url = con.base.replace("http", "ws") + "/ws"
    c = Client(con.base)
    assert c.login("olga") == 200
    cookie = "; ".join(f"{k.name}={k.value}" for k in c.jar)

    def refused(**kw) -> bool:
        try:
            with connect(ws_url, open_timeout=5, **kw) as ws:
                ws.recv(timeout=5)
        except (InvalidStatus, ConnectionClosed):
            return True
        return False

    assert refused(origin=con.base)  # no session
    assert refused(origin="http://evil.example", additional_headers={"Cookie": cookie})  # cross-site hijack
    with connect(ws_url, origin=con.base, additional_headers={"Cookie": cookie}, open_timeout=5) as ws:
        first = json.loads(ws.recv(timeout=5))
        assert first["type"] == "full" and first["stations"][0]["name"] == "st1"
        _publish_until_seen(st, con)
        st.verdict("cam1", 5, "defect")
        deadline = time.monotonic() + 10
        while True:
            msg = json.loads(ws.recv(timeout=5))
            if any(t["last"] and t["last"]["seq"] == 5 for t in msg.get("tiles", [])) or time.monotonic() > deadline:
                break
        assert msg["type"] == "delta" and msg["events"][0]["verdict"] == "defect"


def test_forged_camera_names_and_camera_floods_are_rejected(rig):
    from deploy.console.loadgen import status_message

    st, con, _, _ = rig
    _publish_until_seen(st, con)
    st.verdict("../../etc", 1, "ok")
    st.verdict("<img src=x onerror=alert(1)>", 2, "ok")
    st.send("st1._status", status_message("st1", {f"cam{i}": True for i in range(1000)}))
    st.verdict("cam1", 3, "ok")
    wait_for(lambda: con.health()["recorded"] == 1, 10, "the one good verdict")
    assert con.health()["received"]["rejected"] == 3
    c = Client(con.base)
    assert c.login("olga") == 200
    assert {t["camera"] for t in c.json("/api/state")["tiles"]} == {"cam1"}
