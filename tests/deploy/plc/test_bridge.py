"""`defectscope plc` against a real pymodbus TCP server and a real asyncua server started here: per-part
rejects straight from a station's ZeroMQ stream, alarms from a real console's signed webhook."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pymodbus")
pytest.importorskip("asyncua")

from deploy.console.loadgen import FakeStation  # noqa: E402
from deploy.console.webhook import SIGNATURE, sign  # noqa: E402
from tests.deploy.console.conftest import ROOT, Client, wait_for  # noqa: E402
from tests.deploy.console.test_alarms import alarm_toml  # noqa: E402
from tests.factories import free_port  # noqa: E402

SECRET = b"plc-bridge-key"


class LoopThread:
    """An asyncio loop on its own thread for the test's PLC server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


class ModbusPlc(LoopThread):
    """A pymodbus TCP server; every write request it receives is recorded as (function code, address, value)."""

    def __init__(self) -> None:
        super().__init__()
        from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
        from pymodbus.server import ModbusTcpServer

        self.port = free_port()
        self.writes: list[tuple[int, int, Any]] = []

        def trace(sending: bool, pdu: Any) -> Any:
            if not sending and pdu.function_code in (5, 6):
                self.writes.append(
                    (pdu.function_code, pdu.address, bool(pdu.bits[0]) if pdu.function_code == 5 else pdu.registers[0])
                )
            return pdu

        async def start() -> Any:
            ctx = ModbusServerContext(
                devices=ModbusDeviceContext(
                    co=ModbusSequentialDataBlock(1, [False] * 100), hr=ModbusSequentialDataBlock(1, [0] * 100)
                ),
                single=True,
            )
            server = ModbusTcpServer(ctx, address=("127.0.0.1", self.port), trace_pdu=trace)
            await server.serve_forever(background=True)
            return server

        self.server = self.run(start())

    def last(self, fc: int, address: int) -> Any:
        vals = [v for f, a, v in list(self.writes) if f == fc and a == address]
        return vals[-1] if vals else None

    def close(self) -> None:
        self.run(self.server.shutdown())
        self.stop()


def start_bridge(tmp_path: Path, body: str, port: int) -> subprocess.Popen:
    (tmp_path / "alarm.key").write_bytes(SECRET + b"\n")
    cfg = tmp_path / "plc.toml"
    cfg.write_text(
        f'[listen]\nhost = "127.0.0.1"\nport = {port}\nsecret_file = "alarm.key"\nconsole_lost_after_s = 2.0\n\n' + body
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from defectscope.cli import main; sys.exit(main(sys.argv[1:]))",
            "plc",
            "--config",
            str(cfg),
        ],
        cwd=str(ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: proc.poll() is not None or _health(port) is not None, 30, "the bridge's /healthz")
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    return proc


def _health(port: int) -> dict | None:
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read())
    except OSError:
        return None


def stop_bridge(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode()


def _reject_until_subscribed(st: FakeStation, port: int) -> None:
    """Slow joiner: send 'ok' verdicts (not rejects) until the bridge's subscription is live."""

    def heard() -> bool:
        st.verdict("cam1", 0, "ok")
        return (_health(port) or {}).get("received", 0) > 0

    wait_for(heard, 15, "the bridge's subscription")


def test_modbus_rejects_from_the_stream_and_alarms_from_the_console(tmp_path, console_factory):
    plc = ModbusPlc()
    st = FakeStation("st1")
    bport = free_port()
    proc = None
    try:
        st.heartbeats({"cam1": True})
        proc = start_bridge(
            tmp_path,
            f'[modbus]\nhost = "127.0.0.1"\nport = {plc.port}\n\n'
            "[outputs]\nalarm_active = 0\nalarm_unacknowledged = 1\nconsole_ok = 2\n\n"
            f'[[stations]]\nname = "st1"\nendpoint = "{st.endpoint}"\n\n'
            '[[rejects]]\nstation = "st1"\ncamera = "cam1"\npulse = 10\ncount = 5\npulse_ms = 100\n',
            bport,
        )
        wait_for(lambda: plc.last(5, 2) is False, 10, "console_ok written false before any post")
        _reject_until_subscribed(st, bport)
        (tmp_path / "console.key").write_bytes(SECRET)
        con = console_factory(
            [{"name": "st1", "endpoint": st.endpoint}],
            extra_toml=alarm_toml(f"http://127.0.0.1:{bport}/alarms", str(tmp_path / "console.key")),
        )
        wait_for(lambda: con.health()["received"]["status"] > 0, 10, "the console hears the station")
        for seq in range(1, 4):
            st.verdict("cam1", seq, "defect")
        # rejects: a pulse per part (or one extended pulse) on coil 10, and the counter at 3 in register 5
        wait_for(lambda: plc.last(6, 5) == 3, 10, "reject counter 3")
        wait_for(lambda: plc.last(5, 10) is False, 10, "the pulse ended")
        assert (5, 10, True) in plc.writes
        # the console's alarm (3 defects in a row) arrives over the signed webhook
        wait_for(
            lambda: plc.last(5, 0) is True and plc.last(5, 1) is True and plc.last(5, 2) is True,
            15,
            "alarm active + unacknowledged + console ok",
        )
        olga = Client(con.base)
        assert olga.login("olga") == 200
        alarm_id = olga.json("/api/alarms")["open"][0]["id"]
        assert (
            olga.request("POST", f"/api/alarms/{alarm_id}/ack", b"", {"origin": olga.base, "x-csrf-token": olga.csrf})[
                0
            ]
            == 200
        )
        wait_for(lambda: plc.last(5, 1) is False, 10, "acknowledged")
        assert plc.last(5, 0) is True  # still active until a good part
        # a forged post (no or a wrong signature) changes nothing
        for sig in (None, "sha256=" + "0" * 64):
            req = urllib.request.Request(
                f"http://127.0.0.1:{bport}/alarms",
                method="POST",
                data=b'{"active": false, "unacknowledged": false}',
                headers={SIGNATURE: sig} if sig else {},
            )
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(req, timeout=5)
            assert exc.value.code == 403
        assert _health(bport)["alarm_active"] is True
        con.stop()  # the console goes away: console_ok falls after console_lost_after_s
        wait_for(lambda: plc.last(5, 2) is False, 15, "console_ok false")
    finally:
        if proc is not None:
            err = stop_bridge(proc)
            assert "Traceback" not in err, err[-3000:]
        st.close()
        plc.close()


def test_opcua_node_writes(tmp_path):
    from asyncua import Server, ua

    lt = LoopThread()
    port = free_port()

    async def start() -> tuple[Any, dict[str, Any]]:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/plc/")
        idx = await server.register_namespace("urn:defectscope:test")
        line = await server.nodes.objects.add_object(idx, "Line1")
        nodes = {}
        for name, value, vt in (
            ("Alarm", False, ua.VariantType.Boolean),
            ("Unacked", False, ua.VariantType.Boolean),
            ("Reject", False, ua.VariantType.Boolean),
            ("Rejects", 0, ua.VariantType.Int32),
        ):
            nodes[name] = await line.add_variable(ua.NodeId(f"Line1.{name}", idx), name, ua.Variant(value, vt))
            await nodes[name].set_writable()
        await server.start()
        return server, nodes

    server, nodes = lt.run(start())
    idx = nodes["Alarm"].nodeid.NamespaceIndex
    st = FakeStation("st1")
    bport = free_port()
    proc = None
    try:
        proc = start_bridge(
            tmp_path,
            f'[opcua]\nendpoint = "opc.tcp://127.0.0.1:{port}/plc/"\n\n'
            f'[outputs]\nalarm_active = "ns={idx};s=Line1.Alarm"\n'
            f'alarm_unacknowledged = "ns={idx};s=Line1.Unacked"\n\n'
            f'[[stations]]\nname = "st1"\nendpoint = "{st.endpoint}"\n\n'
            f'[[rejects]]\nstation = "st1"\ncamera = "cam1"\npulse = "ns={idx};s=Line1.Reject"\n'
            f'count = "ns={idx};s=Line1.Rejects"\nverdicts = ["defect", "uncertain"]\n',
            bport,
        )
        _reject_until_subscribed(st, bport)
        st.verdict("cam1", 1, "defect")
        st.verdict("cam1", 2, "uncertain")
        st.verdict("cam1", 3, "ok")
        wait_for(lambda: lt.run(nodes["Rejects"].read_value()) == 2, 15, "two rejects counted on the node")
        body = json.dumps(
            {"type": "alarms", "event": "raised", "alarms": [], "active": True, "unacknowledged": True}
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{bport}/alarms",
            data=body,
            method="POST",
            headers={SIGNATURE: sign(SECRET, body), "content-type": "application/json"},
        )
        assert urllib.request.urlopen(req, timeout=5).status == 204
        wait_for(
            lambda: lt.run(nodes["Alarm"].read_value()) is True and lt.run(nodes["Unacked"].read_value()),
            10,
            "alarm nodes true",
        )
        wait_for(lambda: lt.run(nodes["Reject"].read_value()) is False, 10, "the reject pulse ended")
    finally:
        if proc is not None:
            err = stop_bridge(proc)
            assert "Traceback" not in err, err[-3000:]
        st.close()
        lt.run(server.stop())
        lt.stop()


@pytest.mark.parametrize(
    "body, key",
    [
        ("[outputs]\nalarm_active = 0\n", "'modbus' / 'opcua'"),
        ('[modbus]\nhost = "h"\n[outputs]\nalarm_active = "ns=2;s=X"\n', "outputs.alarm_active"),
        ('[opcua]\nendpoint = "opc.tcp://h:4840"\n[outputs]\nalarm_active = 3\n', "outputs.alarm_active"),
        ('[modbus]\nhost = "h"\n[[rejects]]\nstation = "nope"\ncamera = "cam1"\ncount = 1\n', "rejects[0].station"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(tmp_path, body, key):
    cfg = tmp_path / "plc.toml"
    cfg.write_text(body)
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from defectscope.cli import main; sys.exit(main(sys.argv[1:]))",
            "plc",
            "--config",
            str(cfg),
        ],
        cwd=str(ROOT),
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and key in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_curve_station_reaches_the_plc_and_a_readable_bridge_key_is_refused(tmp_path):
    """A station on the network streams with CURVE and an allow-list: the bridge subscribes with its own
    key pair, and refuses to start with a secret key other accounts could read (as daemon and console do)."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    srv_pub, srv_sec = zmq.auth.create_certificates(keys, "station")
    cli_pub, cli_sec = zmq.auth.create_certificates(keys, "plc")
    os.chmod(cli_sec, 0o600)
    (allowed / "plc.key").write_bytes(Path(cli_pub).read_bytes())
    spub, ssec = zmq.auth.load_certificate(srv_sec)
    plc = ModbusPlc()
    st = FakeStation("st1", curve_secret=ssec, curve_public=spub)
    auth = ThreadAuthenticator(st.ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed))
    bport = free_port()
    body = (
        f'[modbus]\nhost = "127.0.0.1"\nport = {plc.port}\n\n'
        "[outputs]\nalarm_active = 0\nalarm_unacknowledged = 1\nconsole_ok = 2\n\n"
        f'[[stations]]\nname = "st1"\nendpoint = "{st.endpoint}"\n'
        f'curve = {{ server_public_key = "{srv_pub}", client_secret_key = "{cli_sec}" }}\n\n'
        '[[rejects]]\nstation = "st1"\ncamera = "cam1"\ncount = 5\n'
    )
    proc = None
    try:
        proc = start_bridge(tmp_path, body, bport)
        _reject_until_subscribed(st, bport)
        for seq in (1, 2):
            st.verdict("cam1", seq, "defect")
        wait_for(lambda: plc.last(6, 5) == 2, 10, "reject counter 2 through the CURVE stream")
    finally:
        if proc is not None:
            err = stop_bridge(proc)
            assert "Traceback" not in err, err[-3000:]
        auth.stop()
        st.close()
        plc.close()
    os.chmod(cli_sec, 0o640)
    r = subprocess.run(
        [sys.executable, "-c", "import sys; from defectscope.cli import main; sys.exit(main(sys.argv[1:]))"]
        + ["plc", "--config", str(tmp_path / "plc.toml")],
        cwd=str(ROOT),
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "stations[0].curve.client_secret_key" in r.stderr and "0640" in r.stderr, r.stderr
