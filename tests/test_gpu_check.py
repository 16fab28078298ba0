"""bench/gpu_check.py as far as a CPU allows: the "no CUDA device" exit as a real subprocess, and the
table / JSON verdict assembled from recorded step results (so the report runs first time on a Jetson)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None


@pytest.mark.skipif(HAVE_TRT, reason="this machine has TensorRT + pycuda: the no-CUDA path cannot be shown here")
def test_without_cuda_it_says_so_and_exits_3(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == gpu_check.EXIT_NO_CUDA == 3, proc.stderr
    assert proc.stderr.startswith("gpu-check: no CUDA device: ") and "Traceback" not in proc.stderr
    assert "TensorRT" in proc.stderr and not out.exists()


ENTRIES = [
    {
        "model": "classifier",
        "engine": "trt-fp16",
        "backend": "tensorrt",
        "build": {"ok": True, "seconds": 41.7, "detail": ""},
        "gate": {"ok": True, "drop_points": 0.0, "budget_points": 1.0},
        "bare": {"ok": True, "fps": 1800.0, "batch": 8},
        "daemon": {"ok": True, "fps": 1500.0},
    },
    {
        "model": "classifier",
        "engine": "trt-int8",
        "backend": "tensorrt",
        "build": {"ok": True, "seconds": 65.2, "detail": ""},
        "gate": {"ok": True, "drop_points": 0.31, "budget_points": 1.0},
        "bare": {"ok": True, "fps": 2700.0, "batch": 8},
        "daemon": {"ok": True, "fps": 2100.0},
    },
    {
        "model": "classifier",
        "engine": "onnxruntime-cuda fp32",
        "backend": "onnxruntime-cuda",
        "bare": {"ok": True, "fps": 900.0},
    },
    {
        "model": "classifier",
        "engine": "onnxruntime-cpu int8",
        "backend": "onnxruntime-cpu",
        "bare": {"ok": True, "fps": 300.0},
    },
    {
        "model": "detector",
        "engine": "trt-fp16",
        "backend": "tensorrt",
        "build": {"ok": True, "seconds": 120.0, "detail": ""},
        "gate": {"ok": None, "detail": "no station-side box gate"},
        "bare": {"ok": True, "fps": 80.0, "batch": 1},
        "daemon": {"ok": False, "detail": "bench_runtime failed"},
    },
    {
        "model": "detector",
        "engine": "onnxruntime-cuda fp32",
        "backend": "onnxruntime-cuda",
        "bare": {"ok": False, "detail": "no CUDA provider"},
    },
    {
        "model": "detector",
        "engine": "onnxruntime-cpu fp32",
        "backend": "onnxruntime-cpu",
        "bare": {"ok": True, "fps": 10.0},
    },
]


def test_table_rows_speedups_and_verdict() -> None:
    rows = {(r[0], r[1]): r for r in gpu_check.rows(ENTRIES)}
    assert rows[("classifier", "trt-int8")] == [
        "classifier",
        "trt-int8",
        "ok 65s",
        "+0.31 pts",
        "2700.0",
        "3.00x",
        "9.00x",
        "2100.0",
    ]
    assert rows[("classifier", "onnxruntime-cuda fp32")][2:4] == ["-", "-"]
    det = rows[("detector", "trt-fp16")]
    assert det[3] == "n/a" and det[5:] == ["-", "8.00x", "FAIL"]  # no ORT CUDA reference; daemon failed
    assert rows[("detector", "onnxruntime-cuda fp32")][4] == "FAIL"
    text = gpu_check.table(ENTRIES)
    assert text.splitlines()[0].split() == [
        "model",
        "engine",
        "build",
        "gate",
        "bare",
        "fr/s",
        "x",
        "ORT",
        "CUDA",
        "x",
        "ORT",
        "CPU",
        "daemon",
        "fr/s",
    ]
    assert len(text.splitlines()) == 2 + len(ENTRIES)
    assert gpu_check.passed(ENTRIES) is False  # the detector's daemon run failed
    assert gpu_check.passed(ENTRIES[:4]) is True
    failed_gate = [{**ENTRIES[1], "gate": {"ok": False, "drop_points": 2.5, "budget_points": 1.0}}]
    assert gpu_check.passed(failed_gate) is False and gpu_check.rows(failed_gate)[0][3] == "FAIL"


def test_a_missing_bundle_is_a_usage_error_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA present (here: the check answered as on a CUDA machine) a wrong path exits 2 with one line."""
    monkeypatch.setattr(gpu_check, "cuda_unavailable", lambda: None)
    assert gpu_check.main(["--classifier", str(tmp_path / "nope"), "--out", str(tmp_path / "o.json")]) == 2
