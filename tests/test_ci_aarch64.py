"""`.ci/aarch64.sh` never fails CI for missing QEMU / arm64 packages, and its check fails when the
"aarch64" guest is not one (a stub emulator that runs the host's Python)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "aarch64.sh"


def test_ci_runs_the_aarch64_check_and_the_script_parses() -> None:
    assert ".ci/aarch64.sh" in (ROOT / ".ci" / "run").read_text()
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_missing_prerequisites_skip_with_a_reason_and_exit_0(tmp_path: Path) -> None:
    env = {**os.environ, "PY": str(tmp_path / "no-python"), "DEFECTSCOPE_AARCH64_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("SKIP aarch64 check: no project python at ")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the stub guest must not be aarch64")
def test_a_guest_that_is_not_aarch64_fails_the_check(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu-stub"  # drops "-L SYSROOT SYSROOT/usr/bin/python3.11", runs the host's Python
    qemu.write_text(f'#!/bin/sh\nshift 3\nexec {sys.executable} "$@"\n')
    qemu.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "ci_aarch64.py"),
            "--qemu",
            str(qemu),
            "--sysroot",
            str(tmp_path),
            "--site",
            str(tmp_path),
            "--timeout",
            "60",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "FAIL: the guest python does not run as aarch64: 'x86_64'" in r.stdout
