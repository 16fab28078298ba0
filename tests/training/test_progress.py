"""Progress when stderr is not a terminal: log lines every N steps with an ETA, the run's ETA per epoch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.progress import StepLog, fmt_duration, log_every_for, run_eta

ROOT = Path(__file__).resolve().parents[2]


def test_step_log_every_n_and_the_last():
    lines: list[str] = []
    log = StepLog(lines.append, 3, 7, "epoch 1/2")
    for i in range(1, 8):
        log.step(i, 0.5)
    assert [ln.split(" loss")[0] for ln in lines] == ["epoch 1/2 step 3/7", "epoch 1/2 step 6/7", "epoch 1/2 step 7/7"]
    assert all("ETA" in ln and "s/step" in ln for ln in lines)
    assert log_every_for(quiet=True, tty=False) == 0 and log_every_for(quiet=False, tty=True) == 0
    assert log_every_for(quiet=False, tty=False) > 0
    assert run_eta(1, 3, 60.0) == "  ETA 2m00s" and run_eta(3, 3, 60.0) == ""
    assert fmt_duration(3725) == "1h02m"


def _run(argv: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope.cli", *argv],
        capture_output=True,  # stdout and stderr are pipes: no terminal, no bar
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_detector_without_a_terminal_logs_steps_and_eta(tmp_path):
    pytest.importorskip("pycocotools")
    from tests.training.detection.conftest import TINY, write_squares_coco

    root = write_squares_coco(tmp_path / "coco", ("square",))
    tiny = [a for a in TINY if a != "--quiet"]
    out = _run(["train", "--data", str(root / "train.json"), "--out", str(tmp_path / "r"), *tiny, "--epochs", "2",
                "--max-steps-per-epoch", "2"], tmp_path)  # fmt: skip
    assert "epoch 1/2 step 2/2 loss" in out and "ETA" in out.split("epoch 1/2 step 2/2")[1].splitlines()[0]
    epoch1 = next(ln for ln in out.splitlines() if ln.startswith("epoch 1/2 loss"))
    assert "ETA" in epoch1


def test_classifier_without_a_terminal_logs_steps(folder_data, tmp_path):
    argv = ["train", "--data", str(folder_data), "--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32"]
    argv += [
        "--epochs",
        "1",
        "--head-epochs",
        "1",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "c"),
    ]
    out = _run([*argv, "--max-steps-per-epoch", "2"], tmp_path)
    assert "epoch 2/2 step 2/2 loss" in out and "s/step" in out
    assert "ETA" in next(ln for ln in out.splitlines() if ln.startswith("epoch 1/2 ["))
