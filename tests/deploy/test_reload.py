"""install/rollback --reload: SIGHUP the station daemons and gate on /readyz, with automatic rollback.

The daemons are real processes (tests/deploy/station_stub.py) that reload on SIGHUP
with runtime.bundle.manifest verification; reload goes through the configurable reload
command, as ``systemctl reload defectscope@<station>`` does on a station.
"""

from __future__ import annotations

import json

from tests.deploy.conftest import MODELS, current_version, deploy, sighup_command, write_deploy_config


def _setup(tmp_path, stub_stations, bundles, names=("line1",), timeout_s=10.0):
    root = tmp_path / "root"
    write_deploy_config(root, reload_command=sighup_command(stub_stations.pid_dir), timeout_s=timeout_s)
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    stations = [stub_stations(root, n) for n in names]
    assert all(s.version() == "1.0.0" for s in stations)
    return root, stations


def test_install_reloads_every_following_station_and_waits_for_the_version(tmp_path, stub_stations, bundles):
    root, (s1, s2) = _setup(tmp_path, stub_stations, bundles, ("line1", "line2"))
    r = deploy("install", bundles.archive("1.1.0"), "--root", root, "--reload", "--json").json()
    assert sorted(r["reloaded"]) == ["line1", "line2"]
    assert all("1.1.0" in d and d.startswith("ready") for d in r["reloaded"].values())
    assert s1.version() == "1.1.0" and s2.version() == "1.1.0"
    status = deploy("status", "--root", root, "--json").json()
    assert [st["in_sync"] for st in status["stations"]] == [True, True]
    history = json.loads((root / MODELS / "tiny/.deploy-state.json").read_text())["history"]
    assert history[-1]["version"] == "1.1.0" and history[-1]["health"] == "ok"


def test_dead_daemon_fails_the_health_check_and_the_install_is_rolled_back(tmp_path, stub_stations, bundles):
    root, (s1, s2) = _setup(tmp_path, stub_stations, bundles, ("line1", "line2"), timeout_s=3.0)
    s2.stop()  # line2's daemon is gone: it can neither reload nor answer /readyz
    r = deploy("install", bundles.archive("1.1.0"), "--root", root, "--reload", check=4)
    # line1 is back on 1.0.0, but line2 cannot confirm anything: exit 4 says the station needs a person.
    assert "health check failed" in r.stderr and "line2" in r.stderr and "still does not serve it" in r.stderr
    assert current_version(root) == "1.0.0"
    assert s1.version() == "1.0.0"
    history = json.loads((root / MODELS / "tiny/.deploy-state.json").read_text())["history"]
    assert [(h["version"], h["action"], h.get("health")) for h in history[-2:]] == [
        ("1.1.0", "install", "failed"),
        ("1.0.0", "auto-rollback", None),
    ]


def test_reload_failure_on_one_station_restores_the_previous_version(tmp_path, stub_stations, bundles):
    root, (s1,) = _setup(tmp_path, stub_stations, bundles, ("line1",), timeout_s=3.0)
    # The reload command fails (e.g. systemctl refuses): the new version never gets served.
    write_deploy_config(
        root, reload_command="sh -c 'echo unit defectscope@{station}.service not loaded >&2; exit 5'", timeout_s=3.0
    )
    r = deploy("install", bundles.archive("1.1.0"), "--root", root, "--reload", check=4)
    assert "exited 5" in r.stderr and "not loaded" in r.stderr
    assert current_version(root) == "1.0.0"
    # With a working reload command again, the failed version is skipped as a rollback target.
    write_deploy_config(root, reload_command=sighup_command(stub_stations.pid_dir), timeout_s=10.0)
    r = deploy("rollback", "--root", root, check=1)
    assert "no older version" in r.stderr


def test_health_check_failure_with_a_live_station_rolls_back_and_serves_the_old_version(
    tmp_path, stub_stations, bundles
):
    """A daemon that keeps serving the old model (it refused the new one) fails the gate; 1.0.0 keeps serving."""
    root, (s1,) = _setup(tmp_path, stub_stations, bundles, ("line1",), timeout_s=2.0)
    # The reload reaches no daemon, as when a daemon refuses the new bundle and keeps the old one.
    write_deploy_config(root, reload_command="true", timeout_s=2.0)
    r = deploy("install", bundles.archive("1.1.0"), "--root", root, "--reload", check=3)
    assert "serving tiny 1.0.0" in r.stderr and "rolled back to 1.0.0, which is serving again" in r.stderr
    assert current_version(root) == "1.0.0" and s1.version() == "1.0.0"


def test_first_install_failing_its_health_check_leaves_no_current(tmp_path, stub_stations, bundles):
    root = tmp_path / "root"
    write_deploy_config(root, reload_command=sighup_command(stub_stations.pid_dir), timeout_s=2.0)
    stub = stub_stations(root, "line1", run=False)  # configured, never started
    r = deploy("install", bundles.archive("1.0.0"), "--root", root, "--reload", check=3)
    assert "no previous version" in r.stderr and f"127.0.0.1:{stub.port}" in r.stderr
    assert current_version(root) is None


def test_rollback_with_reload_and_station_filter(tmp_path, stub_stations, bundles):
    root, (s1, s2) = _setup(tmp_path, stub_stations, bundles, ("line1", "line2"))
    deploy("install", bundles.archive("1.1.0"), "--root", root, "--reload")
    r = deploy("rollback", "--root", root, "--reload", "--station", "line1", "--json").json()
    assert list(r["reloaded"]) == ["line1"]
    assert s1.version() == "1.0.0" and s2.version() == "1.1.0"  # line2 was not asked
    status = deploy("status", "--root", root, "--json").json()
    assert {st["name"]: st["in_sync"] for st in status["stations"]} == {"line1": True, "line2": False}
    # A re-run reloads only the station that is not serving the active version yet.
    r = deploy("install", bundles.archive("1.0.0"), "--root", root, "--reload", "--json").json()
    assert r["changed"] is False and s2.version() == "1.0.0"
    r = deploy("rollback", "--root", root, "--to", "1.1.0", "--station", "nosuch", "--reload", check=1)
    assert "nosuch" in r.stderr


def test_a_camera_down_does_not_roll_back_a_good_bundle(tmp_path, stub_stations, bundles, monkeypatch):
    """/readyz answers 200 with the new model while a camera is unplugged: the install stands."""
    monkeypatch.setenv("STUB_CAMERA_DOWN", "1")
    root, (s1,) = _setup(tmp_path, stub_stations, bundles, ("line1",), timeout_s=5.0)
    r = deploy("install", bundles.archive("1.1.0"), "--root", root, "--reload", "--json").json()
    assert r["changed"] is True and "camera(s) down: cam0" in r["reloaded"]["line1"]
    assert current_version(root) == "1.1.0" and s1.version() == "1.1.0"


def test_a_failed_reload_reported_by_readyz_rolls_back_without_waiting_for_the_timeout(
    tmp_path, stub_stations, bundles, monkeypatch
):
    import time

    monkeypatch.setenv("STUB_FAIL_RELOADS", "1")
    root, (s1,) = _setup(tmp_path, stub_stations, bundles, ("line1",), timeout_s=30.0)
    started = time.monotonic()
    r = deploy("install", bundles.archive("1.1.0"), "--root", root, "--reload", check=None)
    assert r.returncode in (3, 4) and "out of GPU memory" in r.stderr
    assert time.monotonic() - started < 20  # well before the 30 s timeout
    assert current_version(root) == "1.0.0" and s1.version() == "1.0.0"


def test_old_plain_readyz_body_is_reported_not_crashed_on(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from deploy.service import query_readyz

    class Plain(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ready\n")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = query_readyz(f"http://127.0.0.1:{server.server_port}/readyz")
        assert r.reachable and not r.ready and "'ready' is not JSON" in r.error
    finally:
        server.shutdown()
