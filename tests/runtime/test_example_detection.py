"""runtime/examples/station-detection.toml is accepted by `serve --check` with a detection bundle
(and station.toml, the classifier example, is what a detection bundle refuses)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "runtime" / "examples" / "station-detection.toml"

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("pycocotools")

from tests.training.detection.conftest import det_run  # noqa: E402, F401  (a tiny trained detector run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _localise(text: str, bundle: Path, tmp: Path, frames: Path) -> str:
    """The example with this machine's bundle, free ports, a temp snapshot dir and a replay camera."""
    text = re.sub(r'^bundle = ".*?"', f'bundle = "{bundle}"', text, flags=re.M)
    text = re.sub(r"^bind = \[.*?\]", f'bind = ["tcp://127.0.0.1:{_free_port()}"]', text, flags=re.M)
    text = re.sub(r"^port = \d+", f"port = {_free_port()}", text, flags=re.M)
    text = re.sub(r'^dir = ".*?"', f'dir = "{tmp / "snaps"}"', text, flags=re.M)
    return re.sub(r'^source = "rtsp://.*?"', f'source = "{frames}"', text, flags=re.M)


def _check(cfg: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "defectscope.cli", "serve", "--config", str(cfg), "--check"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_detection_example_passes_serve_check(det_run, tmp_path):  # noqa: F811
    from defectscope.cli import main as ds_main

    root, run = det_run
    bundle = tmp_path / "bundle"
    assert ds_main(["export", str(run), "--out", str(bundle), "--threads", "2", "--parity-images", "2"]) == 0
    frames = tmp_path / "frames"
    frames.mkdir()
    first = sorted((root / "images").rglob("*.png"))[0]
    (frames / first.name).write_bytes(first.read_bytes())
    cfg = tmp_path / "line7-det.toml"
    cfg.write_text(_localise(EXAMPLE.read_text(), bundle, tmp_path, frames))
    proc = _check(cfg)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"]["name"] == "tiny-det-run" and report["config"]["tta"]["mode"] == "always"
    assert all(v == "ok" for v in report["checks"].values())
    # The classifier example, pointed at the same bundle, is refused with the key named.
    cls_cfg = tmp_path / "cls.toml"
    cls_text = (ROOT / "runtime" / "examples" / "station.toml").read_text()
    cls_text = re.sub(r"^\[\[cameras\]\].*", "", cls_text, flags=re.M | re.S)
    cls_text += f'\n[[cameras]]\nid = "c"\nsource = "{frames}"\n'
    cls_cfg.write_text(_localise(cls_text, bundle, tmp_path, frames))
    bad = _check(cls_cfg)
    assert bad.returncode != 0 and ("tta" in bad.stderr or "thresholds" in bad.stderr)
