"""The console's systemd unit (sandbox score) and Ansible role (a real ansible-playbook run on a staging root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.deploy.console.conftest import ROOT, write_console_config

UNIT = ROOT / "deploy/systemd/defectscope-console.service"


def test_console_unit_exposure_is_at_most_2(tmp_path):
    unit_dir = tmp_path / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    shutil.copy(UNIT, unit_dir)
    proc = subprocess.run(
        [require_tool("systemd-analyze"), "security", "--offline=yes", f"--root={tmp_path}", UNIT.name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout
    text = UNIT.read_text()
    assert "DynamicUser=yes" in text and "LoadCredential=console.toml:/etc/defectscope/console.toml" in text


def _ansible_playbook() -> str:
    exe = Path(sys.executable).parent / "ansible-playbook"
    path = str(exe) if exe.is_file() else shutil.which("ansible-playbook")
    if path is None:
        pytest.skip("ansible-playbook not installed (pip install 'defectscope[fleet]')")
    return path


def _play(tmp_path: Path, config: Path, root: Path) -> subprocess.CompletedProcess:
    inv = tmp_path / "inventory.ini"
    defectscope = tmp_path / "defectscope"
    defectscope.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m defectscope "$@"\n')
    defectscope.chmod(0o755)
    inv.write_text(
        f"[defectscope_console]\nconsole1 ansible_connection=local defectscope_console_root={root}\n"
        f"[defectscope_console:vars]\nansible_python_interpreter={sys.executable}\n"
        f"defectscope_console_bin={defectscope}\n"
    )
    env = {
        **os.environ,
        "ANSIBLE_HOME": str(tmp_path / "ah"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "at"),
        "ANSIBLE_REMOTE_TEMP": str(tmp_path / "at"),
        "ANSIBLE_NOCOLOR": "1",
        "LC_ALL": "C.UTF-8",
        "ANSIBLE_ROLES_PATH": str(ROOT / "deploy/ansible/roles"),
    }
    return subprocess.run(
        [
            _ansible_playbook(),
            "-i",
            str(inv),
            str(ROOT / "deploy/ansible/console.yml"),
            "-e",
            "defectscope_become=false",
            "-e",
            f"defectscope_console_config={config}",
            "-e",
            "defectscope_console_manage_service=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_ansible_role_installs_config_and_unit(tmp_path, user_hashes):
    cfg = write_console_config(
        tmp_path / "site.toml",
        [{"name": "st1", "endpoint": "tcp://10.0.0.3:5555"}],
        "sqlite:////var/lib/defectscope-console/results.db",
        user_hashes,
        8470,
    )
    root = tmp_path / "root"
    proc = _play(tmp_path, cfg, root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    installed = root / "etc/defectscope/console.toml"
    assert installed.read_text() == cfg.read_text() and (installed.stat().st_mode & 0o777) == 0o600
    unit = (root / "etc/systemd/system/defectscope-console.service").read_text()
    assert f"{tmp_path / 'defectscope'} console --config" in unit and "/opt/defectscope/venv" not in unit
    # a broken config is refused on the controller and never replaces the installed one
    bad = tmp_path / "bad.toml"
    bad.write_text('[[stations]]\nname = "st1"\nendpoint = "http://nope"\n')
    proc = _play(tmp_path, bad, root)
    assert proc.returncode != 0 and "endpoint" in proc.stdout
    assert installed.read_text() == cfg.read_text()
