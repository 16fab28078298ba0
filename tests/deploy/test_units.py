"""systemd units: installed by `deploy install-units` into a temp root and checked by systemd itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.deploy.conftest import MODELS, deploy, write_station

EXEC = "/opt/defectscope/venv/bin/defectscope"
INSTANCES = (
    "defectscope@line1.service",
    "defectscope-engine@line1.service",
    "defectscope-engine@line1.path",
    "defectscope.target",
)


def _system_unit_dir() -> Path:
    for d in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(d, "multi-user.target").exists():
            return Path(d)
    pytest.skip("no systemd unit directory with multi-user.target on this machine")


@pytest.fixture
def station_root(tmp_path) -> Path:
    """A root with the system's units (targets the units order against), /bin/kill and the defectscope script."""
    root = tmp_path / "root"
    shutil.copytree(_system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("kill") or "/bin/kill", root / "bin/kill")
    exe = root / EXEC.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    write_station(root, "line1", 9108, model="elpv-lite0")
    return root


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("systemd-analyze"), "verify", f"--root={root}", unit], capture_output=True, text=True, cwd=root
    )


def test_installed_units_pass_systemd_analyze_verify(station_root):
    deploy("install-units", "--root", station_root, "--exec", EXEC)
    for unit in INSTANCES:
        proc = _verify(station_root, unit)
        # verify exits 0 on unknown keys and bad values ("..., ignoring."): any output is a finding.
        assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", (
            f"{unit}:\n{proc.stdout}{proc.stderr}"
        )


def test_verify_catches_a_missing_binary_and_a_typo(station_root):
    """The check above can fail: systemd reports what a station would hit."""
    deploy("install-units", "--root", station_root, "--exec", "/usr/local/bin/defectscope")
    proc = _verify(station_root, "defectscope@line1.service")
    assert proc.returncode != 0 and "/usr/local/bin/defectscope is not executable" in proc.stderr
    deploy("install-units", "--root", station_root, "--exec", EXEC)
    unit = station_root / "etc/systemd/system/defectscope@.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=stric"))
    assert "protect system value" in _verify(station_root, "defectscope@line1.service").stderr


def test_units_carry_the_contracted_settings(station_root):
    deploy("install-units", "--root", station_root, "--exec", EXEC)
    unit_dir = station_root / "etc/systemd/system"
    svc = _settings(unit_dir / "defectscope@.service")
    assert svc["Type"] == ["notify"] and svc["Restart"] == ["on-failure"] and svc["WatchdogSec"] == ["30s"]
    assert svc["ExecStart"] == [f"{EXEC} serve --config /etc/defectscope/%i.toml"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["StartLimitBurst"] and svc["StartLimitIntervalSec"]
    assert svc["User"] == ["defectscope"] and "video" in svc["SupplementaryGroups"][0]
    assert svc["CapabilityBoundingSet"] == [""] and svc["NoNewPrivileges"] == ["yes"]
    assert svc["ProtectSystem"] == ["strict"] and svc["PrivateTmp"] == ["yes"] and svc["ProtectHome"] == ["yes"]
    assert set(svc["ReadWritePaths"][0].split()) == {"-/var/spool/defectscope"}
    assert svc["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "char-video4linux rw" in svc["DeviceAllow"] and "char-nvidia-frontend rw" in svc["DeviceAllow"]
    engine = _settings(unit_dir / "defectscope-engine@.service")
    assert engine["Type"] == ["oneshot"] and engine["Before"] == ["defectscope@%i.service"]
    assert any(c.startswith("|/dev/nvidia") for c in engine["ConditionPathExists"])  # skipped without a GPU
    assert engine["ExecStart"][0].startswith(f"{EXEC} deploy build-engine --station-config /etc/defectscope/%i.toml")
    assert "defectscope-engine@%i.service" in svc["Wants"][0] and "defectscope-engine@%i.service" in svc["After"][0]
    # The path unit watches the bundle the station config names.
    dropin = (unit_dir / "defectscope-engine@line1.path.d/10-bundle.conf").read_text()
    assert "PathChanged=\n" in dropin and f"PathChanged=/{MODELS}/elpv-lite0/current" in dropin
    assert "u defectscope" in (station_root / "etc/sysusers.d/defectscope.conf").read_text()
    assert "/var/spool/defectscope" in (station_root / "etc/tmpfiles.d/defectscope.conf").read_text()


def test_daemon_unit_exposure_is_low(station_root):
    """`systemd-analyze security` scores the sandbox; a regression in hardening raises it."""
    deploy("install-units", "--root", station_root, "--exec", EXEC)
    for unit, limit in (("defectscope@line1.service", 2.0), ("defectscope-engine@line1.service", 2.0)):
        proc = subprocess.run(
            [require_tool("systemd-analyze"), "security", "--offline=true", f"--root={station_root}", unit],
            capture_output=True,
            text=True,
            cwd=station_root,
        )
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
        assert m, proc.stdout + proc.stderr
        assert float(m.group(1)) <= limit, f"{unit}: exposure {m.group(1)}\n{proc.stdout}"


def test_enable_links_the_station_units(station_root):
    require_tool("systemctl")
    out = deploy("install-units", "--root", station_root, "--exec", EXEC, "--station", "line1", "--enable").stdout
    assert "enable" in out
    wants = station_root / "etc/systemd/system/defectscope.target.wants"
    assert os.readlink(wants / "defectscope@line1.service").endswith("/defectscope@.service")
    assert os.readlink(wants / "defectscope-engine@line1.path").endswith("/defectscope-engine@.path")
    assert (station_root / "etc/systemd/system/multi-user.target.wants/defectscope.target").is_symlink()
    r = deploy("install-units", "--root", station_root, "--station", "nosuch", check=1)
    assert "nosuch" in r.stderr


def test_install_units_substitutes_custom_paths(tmp_path):
    root = tmp_path / "root"
    cfg = root / "etc/defectscope/deploy.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('[install]\nmodels_dir = "/srv/models"\nconfig_dir = "/etc/inspect"\n')
    deploy("install-units", "--root", root, "--exec", "/usr/bin/defectscope")
    svc = (root / "etc/systemd/system/defectscope@.service").read_text()
    assert "/usr/bin/defectscope serve --config /etc/inspect/%i.toml" in svc
    assert "/opt/defectscope" not in svc and "/etc/defectscope" not in svc
    assert not _writable(_settings(root / "etc/systemd/system/defectscope@.service"), "/srv/models")


def test_unit_files_ship_with_the_package():
    from deploy.units import UNIT_FILES, units_source

    src = units_source()
    for name in UNIT_FILES:
        assert (src / name).is_file()
    # The repository's systemd/ directory is the same files (a link to deploy/systemd), byte for byte.
    repo_systemd = Path(__file__).resolve().parents[2] / "systemd"
    assert sorted(p.name for p in repo_systemd.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (repo_systemd / p.name).read_bytes() == p.read_bytes(), p.name


# Directories systemd makes writable under ProtectSystem=strict (systemd.exec(5)), by setting.
_WRITABLE_ROOTS = {
    "StateDirectory": "/var/lib",
    "CacheDirectory": "/var/cache",
    "LogsDirectory": "/var/log",
    "RuntimeDirectory": "/run",
    "ConfigurationDirectory": "/etc",
}


def _writable(svc: dict[str, list[str]], path: str) -> list[str]:
    """The settings of a unit that let it write to ``path`` (ProtectSystem=strict assumed, checked)."""
    assert svc["ProtectSystem"] == ["strict"]
    grants = [p.lstrip("-+") for v in svc.get("ReadWritePaths", []) for p in v.split()]
    for key, base in _WRITABLE_ROOTS.items():
        grants += [f"{base}/{d.split(':')[0]}" for v in svc.get(key, []) for d in v.split()]
    return [g for g in grants if Path(path).is_relative_to(g) or Path(g).is_relative_to(path)]


def test_daemon_unit_cannot_write_the_model_store(station_root):
    """Issue 25 item 4: the daemon only reads bundles; a compromised daemon must not rewrite the store
    (only root's `deploy install` and the engine unit write there)."""
    deploy("install-units", "--root", station_root, "--exec", EXEC)
    unit_dir = station_root / "etc/systemd/system"
    daemon = _settings(unit_dir / "defectscope@.service")
    assert _writable(daemon, f"/{MODELS}") == [], daemon.get("ReadWritePaths")
    assert _writable(daemon, "/var/spool/defectscope/snapshots")  # the check sees a grant where there is one
    assert _writable(_settings(unit_dir / "defectscope-engine@.service"), f"/{MODELS}/elpv-lite0")


def _settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_daemon_unit_bounds_memory_and_tasks(station_root):
    deploy("install-units", "--root", station_root, "--exec", EXEC)
    svc = _settings(station_root / "etc/systemd/system/defectscope@.service")
    assert svc["MemoryMax"] and svc["TasksMax"] and int(svc["TasksMax"][0]) <= 1024


def _specifiers(text: str) -> str:
    # System-unit values of the specifiers the engine unit uses (systemd.unit(5)).
    return text.replace("%C", "/var/cache").replace("%S", "/var/lib").replace("%h", "/root")


def test_engine_unit_keeps_out_of_the_daemon_state_and_caches_in_its_own_directory(station_root):
    """Issue 14 item 4: no StateDirectory=defectscope (root would chown the daemon's state); the timing
    cache resolves under the unit's own CacheDirectory, not under /root that ProtectHome=yes hides."""
    deploy("install-units", "--root", station_root, "--exec", EXEC)
    unit_dir = station_root / "etc/systemd/system"
    engine = _settings(unit_dir / "defectscope-engine@.service")
    daemon = _settings(unit_dir / "defectscope@.service")
    assert "StateDirectory" not in engine or not set(engine["StateDirectory"]) & set(daemon["StateDirectory"])
    cache_dirs = [f"/var/cache/{d}" for d in engine["CacheDirectory"][0].split()]
    argv = _specifiers(engine["ExecStart"][0]).split()
    cache = Path(argv[argv.index("--timing-cache") + 1])
    assert any(cache.is_relative_to(d) for d in cache_dirs), (cache, cache_dirs)
    assert engine["ProtectHome"] == ["yes"] and not cache.is_relative_to("/root")
    # The same path is what `deploy build-engine` hands to `defectscope build-engine`.
    from deploy.cli import build_parser

    args = build_parser().parse_args(
        ["build-engine", "--station-config", "/etc/defectscope/x.toml", "--timing-cache", str(cache)]
    )
    assert args.timing_cache == cache
