"""The one `defectscope` command: dispatch, help, errors, and the end-to-end demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from defectscope.cli import COMMANDS, command, main, resolve


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_duplicate_registration_refused():
    with pytest.raises(ValueError, match="registered twice"):
        command("train", "x:y", "dup")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_useful_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        resolve(name)(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and len(out.splitlines()) >= 3


def test_station_commands_do_not_import_torch():
    code = (
        "import sys; from defectscope.cli import resolve\n"
        "for n in ('serve', 'reload', 'watch', 'bundle', 'deploy'): resolve(n)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'training', 'calibration'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_demo_end_to_end_smoke(tmp_path):
    """The README's main job on tiny settings: ELPV + EfficientNet-Lite0 through serve."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectscope",
            "demo",
            "--out",
            str(out),
            "--limit",
            "24",
            "--image-size",
            "64",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "--calibration-size",
            "8",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "demo-summary.json").read_text())
    stream = summary["stream"]
    assert stream["verdicts_received"] == stream["frames"] > 0
    assert stream["metrics_frames_inferred"] >= stream["frames"]
    assert summary["default_artifact"] == "int8"
    lines = (out / "stream.jsonl").read_text().splitlines()
    assert len(lines) == stream["frames"]


def test_detection_demo_end_to_end_on_a_tiny_detector(tmp_path):
    """`defectscope demo --task detection` on tiny settings: synth -> train -> export -> INT8 -> serve with boxes."""
    pytest.importorskip("torchvision")
    pytest.importorskip("pycocotools")
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    cells = tmp_path / "cells"  # stand-ins for ELPV cells: textured gray backgrounds
    cells.mkdir()
    rng = np.random.default_rng(0)
    for i in range(14):
        cv2.imwrite(str(cells / f"cell_{i:02d}.png"), rng.normal(150, 10, (72, 96)).clip(0, 255).astype(np.uint8))
    tiny = (
        "--weights none --representation-size 64 --fpn-channels 16 --rpn-pre-nms-train 200 "
        "--rpn-post-nms-train 100 --box-batch-size-per-image 64 --batch-size 4 --quiet --panels 1"
    )
    out = tmp_path / "demo-det"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectscope",
            "demo",
            "--task",
            "detection",
            "--out",
            str(out),
            "--source",
            str(cells),
            "--cells",
            "14",
            "--det-backbone",
            "tiny_det",
            "--det-image-size",
            "64",
            "--det-epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "--threads",
            "2",
            f"--det-train-args={tiny}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "demo-summary.json").read_text())
    stream = summary["stream"]
    assert stream["verdicts_received"] == stream["frames"] > 0
    assert stream["metrics_frames_inferred"] >= stream["frames"]
    assert summary["default_artifact"] in ("int8", "fp32") and "map50" in summary["metrics"]["fp32"]
    msgs = [json.loads(line) for line in (out / "stream.jsonl").read_text().splitlines()]
    assert all(m["task"] == "detection" and isinstance(m.get("detections"), list) for m in msgs)
    for m in msgs:  # boxes are in the original 96x72 frame's pixels
        for d in m["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 72
