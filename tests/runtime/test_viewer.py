"""`defectscope watch`: the state model directly, and the command as a subprocess on a live stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from runtime.config.station import load_config
from runtime.serving.daemon import Daemon
from runtime.tools.viewer import ViewerState, render

from ._helpers import ROOT, make_bundle, make_images, station_config


def _msg(camera: str, seq: int, verdict: str, conf: float = 0.9) -> dict:
    p_defect = conf if verdict != "ok" else 1 - conf
    return {
        "schema_version": 1,
        "type": "verdict",
        "station": "st1",
        "camera": camera,
        "seq": seq,
        "source": None,
        "captured_at": 1_700_000_000.0 + seq,
        "published_at": 1_700_000_000.1 + seq,
        "model": {"name": "m", "version": "1.0", "precision": "int8", "artifact": "int8", "backend": "onnxruntime-cpu"},
        "task": "classification",
        "probabilities": {"ok": 1 - p_defect, "defect": p_defect},
        "top_class": "defect" if p_defect > 0.5 else "ok",
        "top_score": max(p_defect, 1 - p_defect),
        "verdict": verdict,
        "defect_class": None if verdict == "ok" else "defect",
        "confidence": conf,
        "latency_ms": {"queue": 0.1, "preprocess": 0.2, "inference": 1.0, "total": 2.0},
        "tta_views": 1,
        "snapshot": None,
    }


def _status(cams: dict[str, bool]) -> dict:
    return {
        "schema_version": 1,
        "type": "status",
        "station": "st1",
        "state": "serving",
        "published_at": 1.0,
        "model": None,
        "cameras": {
            c: {"up": up, "last_frame_age_s": 0.1, "captured": 1, "published": 1, "dropped": 0}
            for c, up in cams.items()
        },
    }


def test_state_tracks_latest_verdicts_events_rates_and_camera_state() -> None:
    s = ViewerState(rate_window_s=10.0, stale_after_s=5.0)
    for i in range(20):
        s.update(_msg("a", i, "defect" if i % 5 == 0 else "ok"), now=100.0 + i * 0.1)
    s.update(_msg("b", 0, "uncertain", 0.55), now=101.0)
    s.update(_status({"a": True, "b": False}), now=102.0)
    rows = {r["camera"]: r for r in s.rows(now=102.0)}
    assert rows["a"]["verdict"] == "ok" and rows["a"]["seq"] == 19 and rows["a"]["up"] is True
    assert rows["a"]["counts"] == {"ok": 16, "defect": 4, "uncertain": 0}
    assert 5 < rows["a"]["fps"] < 12
    assert rows["a"]["defects_per_min"] == 4 * 60.0 / 2.0  # watched for 2 s so far
    assert rows["b"]["up"] is False and rows["b"]["verdict"] == "uncertain"
    assert [(e["camera"], e["verdict"], e["seq"]) for e in s.events][:2] == [("b", "uncertain", 0), ("a", "defect", 15)]
    # No heartbeat and no frames for longer than stale_after: shown down.
    assert {r["camera"]: r["up"] for r in s.rows(now=200.0)} == {"a": False, "b": False}
    assert s.invalid == 0 and s.received == 22


def test_filters_by_camera_and_verdict_and_counts_invalid() -> None:
    s = ViewerState(cameras=["a"], verdicts=["defect"])
    assert s.update(_msg("a", 0, "defect"), 1.0)
    assert not s.update(_msg("a", 1, "ok"), 1.1)  # counted, but not shown as latest
    assert not s.update(_msg("b", 0, "defect"), 1.2)
    assert not s.update({"schema_version": 1, "type": "verdict"}, 1.3)
    rows = s.rows(2.0)
    assert [r["camera"] for r in rows] == ["a"]
    assert rows[0]["verdict"] == "defect" and rows[0]["seq"] == 0 and rows[0]["counts"]["ok"] == 1
    assert s.invalid == 1 and "missing" in s.last_error


def test_render_produces_a_table() -> None:
    from rich.console import Console

    s = ViewerState()
    s.update(_msg("cam7", 3, "defect", 0.97), 1.0)
    console = Console(record=True, width=160)
    console.print(render(s, 1.5, ["tcp://x:1"]))
    text = console.export_text()
    assert "cam7" in text and "DEFECT" in text and "0.97" in text


def test_watch_command_against_a_running_daemon(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    make_images(tmp_path / "replay", ["ok", "defect", "uncertain"])
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [
            {"id": "cam1", "source": str(tmp_path / "replay"), "loop": True, "fps": 30.0},
            {"id": "cam2", "source": str(tmp_path / "replay"), "loop": True, "fps": 30.0},
        ],
    )
    d = Daemon(load_config(config))
    d.start()
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        once = subprocess.run(
            [sys.executable, "-m", "defectscope", "watch", "--connect", endpoint, "--once", "--timeout", "20"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert once.returncode == 0, once.stderr
        assert "cam1" in once.stdout and "cam2" in once.stdout and "UP" in once.stdout
        lines = subprocess.run(
            [
                sys.executable,
                "-m",
                "defectscope",
                "watch",
                "--connect",
                endpoint,
                "--json",
                "--camera",
                "cam2",
                "--verdict",
                "defect",
                "--duration",
                "1.5",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert lines.returncode == 0, lines.stderr
        msgs = [json.loads(line) for line in lines.stdout.splitlines()]
        verdicts = [m for m in msgs if m["type"] == "verdict"]
        assert verdicts and {(m["camera"], m["verdict"]) for m in verdicts} == {("cam2", "defect")}
    finally:
        d.request_stop()
        t.join(20)
        d.shutdown()
