"""Console config validation and the live state's per-tile coalescing / heartbeat logic."""

from __future__ import annotations

import pytest

from deploy.console.config import ConsoleConfigError, from_dict, load
from deploy.console.live import Live
from deploy.console.loadgen import status_message, verdict_message

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"


@pytest.mark.parametrize(
    "data, key",
    [
        ({"server": {"port": "80"}}, "server.port"),
        ({"server": {"kiosk": 1}}, "server.kiosk"),
        ({"server": {"colour": "red"}}, "server.colour"),
        ({"server": {"coalesce_ms": 5}}, "server.coalesce_ms"),
        ({"server": {"port": -1}}, "server.port"),
        ({"stations": [{"name": "../x", "endpoint": "tcp://a:1"}]}, "stations[0].name"),
        ({"stations": [{"name": "a", "endpoint": "http://a:1"}]}, "stations[0].endpoint"),
        (
            {"stations": [{"name": "a", "endpoint": "tcp://a:1", "curve": {"server_public_key": "k"}}]},
            "stations[0].curve",
        ),
        ({"stations": [{"name": "a", "endpoint": "tcp://a:1"}, {"name": "a", "endpoint": "tcp://b:1"}]}, "stations"),
        ({"users": [{"name": "olga", "role": "root", "password_hash": HASH}]}, "users[0].role"),
        ({"users": [{"name": "olga", "role": "operator", "password_hash": "plaintext"}]}, "users[0].password_hash"),
        ({"users": [{"name": "olga", "role": "operator"}]}, "users[0]"),
        ({"plugins": {}}, "plugins"),
        ({"server": {"forwarded_allow_ips": ["proxy.local"]}}, "server.forwarded_allow_ips"),
        ({"server": {"forwarded_allow_ips": "127.0.0.1"}}, "server.forwarded_allow_ips"),
        ({"server": {"allowed_hosts": ["evil/host"]}}, "server.allowed_hosts"),
        ({"server": {"host": "0.0.0.0"}}, "server.allowed_hosts"),  # a network bind must name its hosts
        ({"server": {"login_max_concurrent": 0}}, "server.login_max_concurrent"),
        ({"server": {"max_body_bytes": 10}}, "server.max_body_bytes"),
    ],
)
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConsoleConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_dict(data, "console.toml")


def test_defaults_and_relative_paths(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[[stations]]\nname = "l1"\nendpoint = "tcp://10.0.0.3:5555"\nsnapshot_dir = "spool/l1"\n')
    cfg = load(p)
    assert cfg.server.host == "127.0.0.1" and not cfg.server.kiosk and cfg.store.url.startswith("sqlite:")
    assert cfg.stations[0].snapshot_dir == tmp_path / "spool/l1"
    with pytest.raises(ConsoleConfigError, match="not valid TOML"):
        p.write_text("[server\n")
        load(p)
    with pytest.raises(ConsoleConfigError, match="not found"):
        load(tmp_path / "missing.toml")


def _live() -> Live:
    return Live(
        from_dict(
            {"stations": [{"name": "st1", "endpoint": "tcp://a:1"}], "server": {"down_after_s": 3.0, "events": 5}}
        )
    )


def test_thirty_fps_coalesces_into_one_update_per_tile():
    live = _live()
    live.on_status(status_message("st1", {"cam1": True, "cam2": True}), now=0.0)
    assert {t["id"] for t in live.delta(now=0.0)["tiles"]} == {"st1/cam1", "st1/cam2"}
    for seq in range(30):  # one second of a 30 fps camera between two pushes
        live.on_verdict(verdict_message("st1", "cam1", seq, "defect" if seq % 10 == 0 else "ok"), f"u{seq}", now=0.5)
    d = live.delta(now=1.0)
    assert [t["id"] for t in d["tiles"]] == ["st1/cam1"]
    assert d["tiles"][0]["last"]["seq"] == 29 and d["tiles"][0]["count"] == 30
    assert d["tiles"][0]["defects_per_min"] == 3 and len(d["events"]) == 3
    assert live.delta(now=1.1) is None  # nothing new: nothing sent
    assert len(live.full(now=1.1)["events"]) == 3


def test_station_goes_down_without_heartbeat_and_on_stopping():
    live = _live()
    live.on_status(status_message("st1", {"cam1": True}), now=0.0)
    live.delta(now=0.0)
    d = live.delta(now=5.0)  # no heartbeat for 5 s > down_after_s
    assert d["stations"][0]["up"] is False and d["tiles"][0]["up"] is False
    live.on_status(status_message("st1", {"cam1": False}), now=6.0)
    d = live.delta(now=6.0)
    assert d["stations"][0]["up"] is True and d["tiles"][0]["up"] is False  # camera down, station up
    live.on_status(status_message("st1", {"cam1": True}, state="stopping"), now=7.0)
    assert live.delta(now=7.0)["stations"][0]["up"] is False


def test_unknown_station_heartbeats_are_ignored_and_events_bounded():
    live = _live()
    live.on_status(status_message("intruder", {"cam1": True}), now=0.0)
    assert not live.tiles
    for seq in range(20):
        live.on_verdict(verdict_message("st1", "cam1", seq, "uncertain"), f"u{seq}", now=0.0)
    assert len(live.full(now=0.0)["events"]) == 5 and live.full(now=0.0)["events"][0]["seq"] == 19


def test_cli_hash_password_and_check_config(tmp_path, capsys, monkeypatch):
    import io

    from argon2 import PasswordHasher

    from defectscope.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-pass\n"))
    assert main(["console", "hash-password", "--stdin"]) == 0
    h = capsys.readouterr().out.strip()
    assert h.startswith("$argon2id$") and PasswordHasher().verify(h, "s3cret-pass")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["console", "hash-password", "--stdin"]) == 1
    good = tmp_path / "c.toml"
    good.write_text(f'[[users]]\nname = "olga"\nrole = "operator"\npassword_hash = "{h}"\n')
    assert main(["console", "check-config", "--config", str(good)]) == 0
    good.write_text('[server]\nport = "x"\n')
    assert main(["console", "check-config", "--config", str(good)]) == 2
    assert "server.port" in capsys.readouterr().err
    assert main(["console", "--config", str(good)]) == 2  # the server refuses the same config


def test_tiles_say_why_they_have_no_signal_and_how_old_their_verdict_is():
    live = _live()
    live.on_status(status_message("st1", {"cam1": True, "cam2": True}), now=0.0)
    live.on_verdict(verdict_message("st1", "cam1", 1, "defect"), "u1", now=0.0)
    tiles = {t["id"]: t for t in live.delta(now=2.0)["tiles"]}
    assert tiles["st1/cam1"]["status"] == "live" and tiles["st1/cam1"]["age_s"] == 2.0
    assert tiles["st1/cam2"]["age_s"] is None and tiles["st1/cam2"]["reason"] is None
    hb = status_message("st1", {"cam1": False, "cam2": True})
    hb["cameras"]["cam1"].update(last_frame_age_s=12.4, decode_errors=3)
    live.on_status(hb, now=2.5)
    (t,) = live.delta(now=2.5)["tiles"]
    assert t["status"] == "no_signal" and t["reason"] == "camera down: no frame for 12 s, 3 unreadable frames"
    live.on_status(status_message("st1", {"cam1": True, "cam2": True}, state="reloading"), now=3.0)
    assert {t["reason"] for t in live.delta(now=3.0)["tiles"]} == {"model reloading"}
    d = live.delta(now=9.0)  # no heartbeat since 3.0
    assert {t["reason"] for t in d["tiles"]} == {"daemon down: no heartbeat for over 3 s"}
    assert live.full(now=9.0)["stale_after_s"] == 5.0


def test_a_camera_the_heartbeat_no_longer_lists_is_removed():
    live = _live()
    live.on_status(status_message("st1", {"cam1": True, "cam2": True}), now=0.0)
    live.delta(now=0.0)
    live.on_status(status_message("st1", {"cam1": True}), now=1.0)
    d = live.delta(now=1.0)
    assert d["removed"] == ["st1/cam2"] and [t["id"] for t in live.full(now=1.0)["tiles"]] == ["st1/cam1"]
    assert live.delta(now=1.1) is None
