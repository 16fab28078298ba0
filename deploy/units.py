"""Install the systemd units (``deploy/systemd``) into a station tree with its real paths."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deploy import UNITS_DIR
from deploy.config import DeployConfig, DeployError, discover_stations, rooted
from runtime.fsio import atomic_write_text

# Paths as written in the shipped unit files; install-units substitutes the real ones.
DEFAULT_EXEC = "/opt/defectscope/venv/bin/defectscope"
DEFAULT_MODELS_DIR = "/opt/defectscope/models"
DEFAULT_CONFIG_DIR = "/etc/defectscope"
UNIT_FILES = ("defectscope@.service", "defectscope-engine@.service", "defectscope-engine@.path", "defectscope.target")
# shipped name -> station path
EXTRA_FILES = {
    "defectscope.sysusers.conf": "/etc/sysusers.d/defectscope.conf",
    "defectscope.tmpfiles.conf": "/etc/tmpfiles.d/defectscope.conf",
}


def default_exec() -> str:
    """The ``defectscope`` script of the running installation (venv first), else the default path."""
    beside = Path(sys.executable).parent / "defectscope"
    if beside.is_file():
        return str(beside)
    found = shutil.which("defectscope")
    return found or DEFAULT_EXEC


def units_source() -> Path:
    if not (UNITS_DIR / UNIT_FILES[0]).is_file():
        raise DeployError(f"{UNITS_DIR}: systemd unit files are missing from this installation")
    return UNITS_DIR


def render(text: str, exec_path: str, cfg: DeployConfig) -> str:
    """Substitute the installation's paths into a shipped unit file."""
    return (
        text.replace(DEFAULT_EXEC, exec_path)
        .replace(DEFAULT_MODELS_DIR, cfg.models_dir)
        .replace(DEFAULT_CONFIG_DIR + "/", cfg.config_dir.rstrip("/") + "/")
        .replace(DEFAULT_CONFIG_DIR + " ", cfg.config_dir.rstrip("/") + " ")
    )


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text, mode=0o644)


@dataclass
class UnitsReport:
    written: list[str] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def install_units(
    root: Path,
    cfg: DeployConfig,
    exec_path: str | None = None,
    stations: list[str] | None = None,
    enable: bool = False,
    now: bool = False,
    unit_dir: str = "/etc/systemd/system",
) -> UnitsReport:
    """Write the units, sysusers/tmpfiles snippets and per-station path drop-ins under ``root``.

    With ``enable`` the stations' units are enabled (``systemctl [--root] enable``); on the
    live system (root ``/``) users, directories and the unit cache are refreshed too.
    """
    root = Path(root)
    live = root.resolve() == Path("/")
    exec_path = exec_path or default_exec()
    if not exec_path.startswith("/"):
        raise DeployError(f"--exec: expected an absolute path to the defectscope script, got {exec_path!r}")
    report = UnitsReport()
    if not rooted(root, exec_path).is_file():
        report.warnings.append(f"{rooted(root, exec_path)} does not exist (yet): the units' ExecStart= points there")
    src = units_source()
    target = rooted(root, unit_dir)
    for name in UNIT_FILES:
        _write(target / name, render((src / name).read_text(encoding="utf-8"), exec_path, cfg))
        report.written.append(str(target / name))
    for name, station_path in EXTRA_FILES.items():
        dest = rooted(root, station_path)
        _write(dest, render((src / name).read_text(encoding="utf-8"), exec_path, cfg))
        report.written.append(str(dest))
    found = discover_stations(root, cfg, stations)
    for st in found:
        dropin = target / f"defectscope-engine@{st.name}.path.d" / "10-bundle.conf"
        _write(
            dropin,
            (
                f"# Written by `defectscope deploy install-units` from {st.config_path.name} ([model] bundle).\n"
                "[Path]\n"
                "PathChanged=\n"  # reset the template's fallback path
                f"PathChanged={st.bundle}\n"
            ),
        )
        report.written.append(str(dropin))
    if stations is None and not found:
        report.warnings.append(f"no station configs in {rooted(root, cfg.config_dir)}: no station drop-ins written")
    if not (enable or now):
        return report
    if not found:
        raise DeployError("--enable: no station to enable (give --station NAME or add /etc/defectscope/<station>.toml)")
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise DeployError("--enable needs systemctl, which is not installed here")
    units = ["defectscope.target"]
    for st in found:
        units += [f"defectscope@{st.name}.service", f"defectscope-engine@{st.name}.path"]
    if live:
        for argv in (
            ["systemd-sysusers", "defectscope.conf"],
            ["systemd-tmpfiles", "--create", "defectscope.conf"],
            [systemctl, "daemon-reload"],
        ):
            _run(argv, report)
        _run([systemctl, "enable", *(["--now"] if now else []), *units], report)
    else:
        if now:
            raise DeployError("--now starts services, which only makes sense on the live system (--root /)")
        _run([systemctl, f"--root={root}", "enable", *units], report)
    report.enabled = units
    return report


def _run(argv: list[str], report: UnitsReport) -> None:
    report.commands.append(" ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeployError(f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
