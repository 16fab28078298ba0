"""Fleet rollout with the real ansible-playbook: three local-connection hosts, each its own --root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import ANSIBLE_DIR
from tests.deploy.conftest import MODELS, current_version, deploy, sighup_command, write_deploy_config

HOSTS = ("st1", "st2", "st3")


def _ansible_playbook() -> str:
    # The fleet extra installs ansible-core into the same environment as defectscope.
    exe = Path(sys.executable).parent / "ansible-playbook"
    path = str(exe) if exe.is_file() else shutil.which("ansible-playbook")
    if path is None:
        pytest.skip("ansible-playbook not installed (pip install 'defectscope[fleet]')")
    return path


@pytest.fixture
def fleet(tmp_path, stub_stations, bundles):
    """Three stations on 1.0.0 with running daemons, and an inventory pointing at their roots."""
    roots = {}
    for host in HOSTS:
        root = roots[host] = tmp_path / host
        write_deploy_config(root, reload_command=sighup_command(stub_stations.pid_dir), timeout_s=10)
        deploy("install", bundles.archive("1.0.0"), "--root", root)
    stubs = {host: stub_stations(roots[host], f"{host}-line") for host in HOSTS}
    assert all(s.version() == "1.0.0" for s in stubs.values())
    defectscope = Path(sys.executable).parent / "defectscope"
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(
        "[defectscope_stations]\n"
        + "".join(f"{h} ansible_connection=local defectscope_root={roots[h]}\n" for h in HOSTS)
        + "[defectscope_stations:vars]\n"
        f"ansible_python_interpreter={sys.executable}\n"
        f"defectscope_bin={defectscope}\n"
        "defectscope_ready_timeout=10\n"
    )
    return {"roots": roots, "stubs": stubs, "inventory": inventory, "tmp": tmp_path}


def _play(fleet, playbook: str, **extra: str) -> subprocess.CompletedProcess:
    tmp = fleet["tmp"]
    env = {
        **os.environ,
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "LC_ALL": "C.UTF-8",
    }
    args = [
        _ansible_playbook(),
        "-i",
        str(fleet["inventory"]),
        str(ANSIBLE_DIR / playbook),
        "-e",
        "defectscope_become=false",
    ]
    for k, v in extra.items():
        args += ["-e", f"{k}={v}"]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def _versions(fleet) -> dict[str, tuple[str | None, str | None]]:
    """host -> (current link, version the daemon serves)."""
    return {h: (current_version(fleet["roots"][h]), fleet["stubs"][h].version()) for h in HOSTS}


def test_good_bundle_rolls_out_in_batches_and_the_fleet_rolls_back(fleet, bundles):
    proc = _play(fleet, "rollout.yml", defectscope_bundle=str(bundles.archive("1.1.0")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _versions(fleet) == {h: ("1.1.0", "1.1.0") for h in HOSTS}
    # serial [1, 25%]: a canary batch of one host, then the others one batch at a time.
    assert proc.stdout.count("PLAY [Roll out a DefectScope model bundle]") == 3
    assert "serving on st1-line" in proc.stdout

    proc = _play(fleet, "rollback.yml")
    assert proc.returncode != 0 and "defectscope_rollback_from" in proc.stdout  # a bare rollback is not idempotent
    for _ in range(2):  # the re-run changes nothing more (issue 14 item 7)
        proc = _play(fleet, "rollback.yml", defectscope_rollback_from="1.1.0")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _versions(fleet) == {h: ("1.0.0", "1.0.0") for h in HOSTS}
    assert "changed=0" in proc.stdout and "changed=1" not in proc.stdout
    proc = _play(fleet, "rollback.yml", defectscope_rollback_to="1.1.0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _versions(fleet) == {h: ("1.1.0", "1.1.0") for h in HOSTS}


def test_tampered_bundle_stops_at_the_first_host(fleet, bundles, tmp_path):
    bad = bundles.tampered_archive("1.1.0", tmp_path / "tiny-1.1.0.tar.gz")
    proc = _play(fleet, "rollout.yml", defectscope_bundle=str(bad))
    assert proc.returncode != 0
    assert "checksum mismatch" in proc.stdout + proc.stderr
    assert _versions(fleet) == {h: ("1.0.0", "1.0.0") for h in HOSTS}
    # Hosts after the canary were never touched: the archive never reached them.
    incoming = "var/lib/defectscope-deploy/incoming/tiny-1.1.0.tar.gz"
    assert (fleet["roots"]["st1"] / incoming).is_file()
    assert not (fleet["roots"]["st2"] / incoming).exists() and not (fleet["roots"]["st3"] / incoming).exists()


def test_health_gate_failure_rolls_the_canary_back_and_stops(fleet, bundles):
    # st1's daemon never picks up the new model (as if it refused it and kept serving 1.0.0).
    write_deploy_config(fleet["roots"]["st1"], reload_command="true", timeout_s=3)
    proc = _play(fleet, "rollout.yml", defectscope_bundle=str(bundles.archive("1.1.0")), defectscope_ready_timeout="3")
    assert proc.returncode != 0
    assert "rolled back to 1.0.0, which is serving again" in proc.stdout + proc.stderr
    assert _versions(fleet) == {h: ("1.0.0", "1.0.0") for h in HOSTS}
    # st1 has 1.1.0 installed but marked failed; st2/st3 never got it.
    assert (fleet["roots"]["st1"] / MODELS / "tiny/1.1.0").is_dir()
    assert not (fleet["roots"]["st2"] / MODELS / "tiny/1.1.0").exists()


def test_incoming_directory_is_root_only_and_outside_the_daemon_state(fleet, bundles):
    """Issue 14 item 3: the daemon user (who owns /var/lib/defectscope) cannot plant what root installs."""
    archive = bundles.archive("1.1.0")
    proc = _play(fleet, "rollout.yml", defectscope_bundle=str(archive))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = fleet["roots"]["st1"]
    incoming = root / "var/lib/defectscope-deploy/incoming"
    assert not incoming.is_relative_to(root / "var/lib/defectscope")
    for d in (incoming, incoming.parent):
        assert d.stat().st_mode & 0o777 == 0o700
    archive = incoming / archive.name
    assert archive.stat().st_mode & 0o777 == 0o600 and archive.stat().st_uid == os.geteuid()


def test_unsigned_bundle_is_not_pushed_to_a_station_with_keys(fleet, bundles, tmp_path):
    """Issue 14 item 8: the role refuses before copying, not only the station's install."""
    key = tmp_path / "release.key"
    deploy("keygen", key)
    root = fleet["roots"]["st1"]
    (root / "etc/defectscope/keys").mkdir(parents=True)
    shutil.copy(key.with_suffix(".pub"), root / "etc/defectscope/keys/release.pub")
    cfg = root / "etc/defectscope/deploy.toml"
    cfg.write_text('[signing]\npublic_keys = ["/etc/defectscope/keys/release.pub"]\n' + cfg.read_text())
    unsigned = shutil.copy(bundles.archive("1.1.0"), tmp_path / "tiny-1.1.0.tar.gz")
    proc = _play(fleet, "rollout.yml", defectscope_bundle=str(unsigned))
    assert proc.returncode != 0 and "only installs signed bundles" in proc.stdout
    assert not (root / "var/lib/defectscope-deploy/incoming/tiny-1.1.0.tar.gz").exists()
    assert _versions(fleet) == {h: ("1.0.0", "1.0.0") for h in HOSTS}
    deploy("sign", unsigned, "--key", key)
    proc = _play(fleet, "rollout.yml", defectscope_bundle=str(unsigned))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _versions(fleet) == {h: ("1.1.0", "1.1.0") for h in HOSTS}
