"""`defectscope doctor` as a real subprocess: what the station has and which features that enables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from ._helpers import ROOT

NO_GI = "import sys; sys.modules['gi'] = None; "


def _doctor(*args: str, preamble: str = "", pythonpath: str = "") -> subprocess.CompletedProcess[str]:
    code = preamble + "import sys; from defectscope.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), pythonpath) if p)}
    return subprocess.run(
        [sys.executable, "-c", code, "doctor", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_doctor_reports_opencv_flags_providers_and_python() -> None:
    r = _doctor("--json", preamble=NO_GI)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["system"]["python"] == ".".join(map(str, sys.version_info[:3]))
    info = cv2.getBuildInformation()
    assert rep["opencv"]["version"] == cv2.__version__
    for key, name in (("gstreamer", "GStreamer"), ("ffmpeg", "FFMPEG")):
        line = next(ln for ln in info.splitlines() if ln.strip().startswith(name + ":"))
        assert rep["opencv"][key] == line.split(":", 1)[1].strip()
    import onnxruntime

    assert rep["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    assert rep["features"]["onnxruntime-cpu backend"] == "yes"
    assert set(rep["tensorrt"]) >= {"tensorrt", "pycuda", "available"}
    assert "available" in rep["cuda"]
    assert rep["gstreamer"]["available"] is False and "gi" in rep["gstreamer"]["why"]
    if not rep["opencv"]["gstreamer"].upper().startswith("YES"):
        assert rep["features"]["gstreamer cameras"].startswith("no (")


def test_doctor_text_report_has_no_traceback() -> None:
    r = _doctor(preamble=NO_GI)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "features:" in r.stdout and "gstreamer cameras" in r.stdout


def test_doctor_sees_pygobject_and_the_pipeline_elements(tmp_path: Path) -> None:
    gi = "/usr/lib/python3/dist-packages/gi"
    tag = sys.implementation.cache_tag.replace("cpython-", "")
    if not list(Path(gi).glob(f"_gi.cpython-{tag}*.so")):
        pytest.skip(f"no Debian python3-gi for this Python ({sys.implementation.cache_tag})")
    (tmp_path / "gi").symlink_to(gi)
    rep = json.loads(_doctor("--json", pythonpath=str(tmp_path)).stdout)
    if not rep["gstreamer"]["available"]:
        pytest.skip(f"GStreamer typelibs missing: {rep['gstreamer']['why']}")
    assert rep["gstreamer"]["version"].startswith("GStreamer 1.")
    assert rep["gstreamer"]["elements"]["appsink"] is True
    assert rep["gstreamer"]["elements"]["nvv4l2decoder"] is False  # no Jetson here
    assert rep["features"]["gstreamer cameras"] == "yes (PyGObject)"
    assert rep["features"]["rtsp hardware decode (nvv4l2decoder)"].startswith("no (")


def test_doctor_warns_when_a_pip_opencv_shadows_jetpack(tmp_path: Path) -> None:
    """On a Jetson (L4T release file present) the pip OpenCV wheel is the shadowing problem of issue 30;
    --strict turns the warning into exit 1. A subprocess: torch, loaded by other tests, and OpenVINO
    do not share a process with GStreamer (never the case on a station, which has no torch)."""
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic, EABI: aarch64\n")
    on_jetson = (
        NO_GI + f"import pathlib, runtime.tools.doctor_cli as d; d.TEGRA_RELEASE = pathlib.Path({str(release)!r}); "
    )
    r = _doctor("--json", "--strict", preamble=on_jetson)
    rep = json.loads(r.stdout)
    assert rep["system"]["jetson_l4t"].startswith("# R36")
    if rep["opencv"]["pip_wheels"]:
        assert any("shadows JetPack's OpenCV" in w for w in rep["warnings"])
        assert r.returncode == 1
    r = _doctor(
        "--json",
        "--strict",
        preamble=NO_GI + "import pathlib, runtime.tools.doctor_cli as d; "
        f"d.TEGRA_RELEASE = pathlib.Path({str(tmp_path / 'absent')!r}); ",
    )
    assert not any("shadows" in w for w in json.loads(r.stdout)["warnings"])
