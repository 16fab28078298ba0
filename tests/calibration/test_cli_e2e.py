"""The `defectscope` commands as a user runs them (real subprocesses through the dispatcher)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def _run(*args, timeout=180):
    env = {**os.environ, "DEFECTSCOPE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "defectscope", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_export_calibrate_verify_and_plan_engine(run_dir, tmp_path):
    bundle = tmp_path / "bundle"
    r = _run("export", run_dir, "--out", bundle, "--name", "parts", "--version", "1.2.0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parity ok" in r.stdout and "bundle written" in r.stdout
    r = _run("calibrate", bundle, "--size", "24", "--method", "percentile", "--target", "both")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED" in r.stdout
    r = _run("bundle", "verify", bundle)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["version"] == "1.2.0" and manifest["default_artifact"] == "int8"
    assert manifest["provenance"]["calibration"]["method"] == "percentile"
    r = _run("build-engine", bundle, "--precision", "int8", "--dry-run", "--tensorrt-version", "10.3.0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["plan"]["source_file"] == "model.int8.trt.onnx"


@pytest.mark.slow
def test_train_export_calibrate(dataset, tmp_path):
    """The whole workstation path starting from `defectscope train` (tiny_cnn, a few epochs)."""
    run = tmp_path / "run"
    r = _run(
        "train",
        "--data",
        dataset,
        "--backbone",
        "tiny_cnn",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "4",
        "--head-epochs",
        "2",
        "--out",
        run,
        "--threads",
        "1",
        "--quiet",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    bundle = tmp_path / "bundle"
    assert _run("export", run, "--out", bundle).returncode == 0
    r = _run("calibrate", bundle, "--size", "32")
    assert r.returncode in (0, 3), r.stdout + r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["provenance"]["training"]["run_dir"] == str(run.resolve())
    if r.returncode == 0:
        assert "int8" in manifest["artifacts"]
