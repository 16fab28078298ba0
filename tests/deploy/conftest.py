"""Fixtures for deploy tests: tiny bundles, station trees under a temp --root, stand-in daemons."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.factories import free_port, make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
MODELS = "opt/defectscope/models"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def deploy(*args: str | Path, check: int | None = 0) -> Result:
    """``deploy.cli.main`` in-process (fast); output captured."""
    from deploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            rc = int(exc.code or 0)
    result = Result(rc, out.getvalue(), err.getvalue())
    if check is not None and rc != check:
        raise AssertionError(
            f"deploy {' '.join(map(str, args))} exited {rc} (expected {check})\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def run_deploy(*args: str | Path, check: int | None = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    """``defectscope deploy ...`` as a real subprocess (what an admin or Ansible runs)."""
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope.cli", "deploy", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=180,
    )
    if check is not None and proc.returncode != check:
        raise AssertionError(
            f"deploy {' '.join(map(str, args))} exited {proc.returncode} (expected {check})\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


class Bundles:
    """Tiny bundles (dir + .tar.gz) per (name, version), made once per session."""

    def __init__(self, base: Path):
        self.base = base
        self._made: dict[tuple[str, str, int], tuple[Path, Path]] = {}

    def _make(self, version: str, name: str, seed: int) -> tuple[Path, Path]:
        from runtime.bundle.archive import pack

        key = (name, version, seed)
        if key not in self._made:
            d = self.base / f"{name}-{version}-s{seed}"
            if seed:
                # Same name/version, different weights: a "rebuilt" bundle.
                from runtime.bundle.write import write_bundle
                from tests.factories import make_tiny_onnx, tiny_manifest

                onnx = make_tiny_onnx(self.base / f".src-{name}-{version}-{seed}" / "model.onnx", seed=seed)
                write_bundle(d, tiny_manifest(name=name, version=version), {"model.onnx": onnx})
            else:
                make_tiny_bundle(d, version=version, name=name)
            self._made[key] = (d, pack(d, self.base / f"{name}-{version}-s{seed}.tar.gz"))
        return self._made[key]

    def dir(self, version: str, name: str = "tiny", seed: int = 0) -> Path:
        return self._make(version, name, seed)[0]

    def archive(self, version: str, name: str = "tiny", seed: int = 0) -> Path:
        return self._make(version, name, seed)[1]

    def tampered_archive(self, version: str, dest: Path, name: str = "tiny") -> Path:
        """The archive of a valid bundle whose model.onnx was changed after packing (checksum mismatch)."""
        src = self.dir(version, name)
        work = dest.parent / f".tamper-{dest.name}"
        shutil.copytree(src, work)
        with open(work / "model.onnx", "ab") as fh:
            fh.write(b"\0tampered")
        with tarfile.open(dest, "w:gz") as tar:
            for f in ("model.onnx", "manifest.json"):
                tar.add(work / f, arcname=f)
        shutil.rmtree(work)
        return dest


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> Bundles:
    return Bundles(tmp_path_factory.mktemp("bundles"))


def write_station(root: Path, name: str, port: int, model: str = "tiny", extra: str = "") -> Path:
    """A station config under ``root`` following ``<models>/<model>/current``."""
    cfg_dir = root / "etc/defectscope"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    path = cfg_dir / f"{name}.toml"
    path.write_text(
        f'station = "{name}"\n[model]\nbundle = "/{MODELS}/{model}/current"\n'
        f'[metrics]\nhost = "127.0.0.1"\nport = {port}\n{extra}'
    )
    return path


def write_deploy_config(
    root: Path,
    reload_command: str | None = None,
    keep: int | None = None,
    public_keys: list[str] | None = None,
    timeout_s: float = 15.0,
) -> Path:
    lines = []
    if keep is not None:
        lines += ["[install]", f"keep = {keep}"]
    if public_keys is not None:
        lines += ["[signing]", f"public_keys = {json.dumps(public_keys)}"]
    lines += ["[service]", f"ready_timeout_s = {timeout_s}"]
    if reload_command is not None:
        lines.append(f"reload_command = {json.dumps(reload_command)}")
    path = root / "etc/defectscope/deploy.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def sighup_command(pid_dir: Path) -> str:
    """A reload command that SIGHUPs the process in ``<pid_dir>/<station>.pid`` (systemctl's job on a station)."""
    return f"sh -c 'kill -HUP \"$(cat {pid_dir}/{{station}}.pid)\"'"


def readyz(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


class StubStation:
    """tests/deploy/station_stub.py running as a real process for one station config."""

    def __init__(self, root: Path, name: str, port: int, pid_dir: Path):
        self.root, self.name, self.port = root, name, port
        self.pid_file = pid_dir / f"{name}.pid"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> StubStation:
        self.pid_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.deploy.station_stub",
                "--config",
                str(self.root / "etc/defectscope" / f"{self.name}.toml"),
                "--root",
                str(self.root),
                "--pid-file",
                str(self.pid_file),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self.pid_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"stub station {self.name} exited: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"stub station {self.name} did not start in {timeout_s} s")
            time.sleep(0.05)
        return self

    def version(self) -> str | None:
        body = readyz(self.port)
        return (body.get("model") or {}).get("version")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def stub_stations(tmp_path):
    """Factory: ``start(root, name) -> StubStation`` (writes the station config, reload via SIGHUP)."""
    started: list[StubStation] = []
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()

    def start(root: Path, name: str, model: str = "tiny", run: bool = True) -> StubStation:
        port = free_port()
        write_station(root, name, port, model)
        stub = StubStation(root, name, port, pid_dir)
        started.append(stub)
        return stub.start() if run else stub

    start.pid_dir = pid_dir
    yield start
    for s in started:
        s.stop()


def current_version(root: Path, name: str = "tiny") -> str | None:
    link = root / MODELS / name / "current"
    return os.readlink(link) if link.is_symlink() else None


def tree(root: Path) -> list[str]:
    """Every path under root (symlinks shown with their target), for before/after comparisons."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out.append(f"{rel} -> {os.readlink(p)}" if p.is_symlink() else rel)
    return out
