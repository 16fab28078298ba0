"""`defectscope calibrate` end to end on the tiny bundle: artifacts, manifest records, runtime use."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")


def test_calibrated_bundle_records_everything(calibrated, exported, splits):
    from calibration.calibset import CalibrationSet
    from runtime.bundle.load import load_bundle

    b = load_bundle(calibrated)
    m = b.manifest
    assert set(m.artifacts) == {"fp32", "int8", "int8-trt"} and m.default_artifact == "int8"
    calib = CalibrationSet.from_dict(json.loads((calibrated / "calibration.json").read_text()))
    calib.verify_files()
    assert len(calib) == 40 and calib.class_counts() == {"defect": 20, "ok": 20}
    assert {i.path for i in calib.items} <= {s.path for s in splits.train}
    assert m.provenance["calibration"] == {
        "fingerprint": calib.fingerprint,
        "method": "minmax",
        "size": 40,
        "seed": 0,
        "source": "train split",
        "file": "calibration.json",
    }
    # Export-time provenance survives calibration.
    assert m.provenance["config_hash"] == "cfg-test" and m.provenance["export"]["parity"]["passed"]
    for key, act, sym in (("int8", "uint8", False), ("int8-trt", "int8", True)):
        a = m.artifacts[key]
        assert a.format == "onnx" and a.precision == "int8"
        q = a.quantization
        assert q["method"] == "minmax" and q["per_channel"] is True and q["format"] == "qdq"
        assert q["activation_type"] == act and q["activation_symmetric"] is sym
        # No accuracy fallback was needed; only layers timed faster in float (CPU target) may stay float.
        speed_nodes = q.get("float_for_speed", {}).get("nodes", [])
        assert q["calibration_fingerprint"] == calib.fingerprint and q["float_nodes"] == speed_nodes
        assert key == "int8" or speed_nodes == []
        # The CPU target records the count that rebuilds it (``--float-prefix N``); TensorRT takes no timing.
        assert (q["float_prefix"] == len(speed_nodes)) if key == "int8" else "float_prefix" not in q
        metrics = m.metrics[key]
        assert metrics["split"] == "test" and metrics["n"] == len(splits.test)
        assert metrics["gate"]["passed"] is True and metrics["gate"]["budget_points"] == 1.0
        assert set(metrics["per_class_recall"]) == {"defect", "ok"}
    assert m.metrics["fp32"]["accuracy"] == load_bundle(exported).manifest.metrics["fp32"]["accuracy"]
    assert m.metrics["int8"]["accuracy"] >= m.metrics["fp32"]["accuracy"] - 0.01


def test_runtime_runs_the_int8_artifact(calibrated, splits):
    from calibration.evaluate import ort_session
    from runtime.bundle.load import load_bundle
    from runtime.inference.preprocess import Preprocessor

    b = load_bundle(calibrated)
    x = Preprocessor(b.manifest.input).load_batch([s.path for s in splits.test])
    y = np.array([s.label for s in splits.test])
    for key in ("int8", "int8-trt"):
        logits = ort_session(b.artifact_path(key), 1).run(None, {"input": x})[0]
        assert logits.shape == (len(y), 2) and (logits.argmax(1) == y).mean() >= 0.9


def test_calibration_is_reproducible_and_saves_the_tensor(exported, calibrated, tmp_path):
    from calibration.calibset import load_tensor
    from calibration.cli import calibrate_main
    from runtime.bundle.load import load_bundle

    out = tmp_path / "again"
    npy = tmp_path / "calib.npy"
    a = load_bundle(calibrated)
    # The fixture's float prefix was timed (``auto``), which can choose differently under load; its
    # recorded count is what rebuilds the same bytes anywhere.
    prefix = a.manifest.artifacts["int8"].quantization["float_prefix"]
    assert (
        calibrate_main(
            [
                str(exported),
                "--out",
                str(out),
                "--target",
                "both",
                "--size",
                "40",
                "--threads",
                "1",
                "--method",
                "minmax",
                "--float-prefix",
                str(prefix),
                "--save-calibration-tensor",
                str(npy),
            ]
        )
        == 0
    )
    b = load_bundle(out)
    assert a.manifest.provenance["calibration"] == b.manifest.provenance["calibration"]
    assert a.manifest.files["model.int8.onnx"] == b.manifest.files["model.int8.onnx"]  # byte-identical model
    x, meta = load_tensor(npy, b.manifest.input)
    assert x.shape == (40, 3, 32, 32) and meta["fingerprint"] == b.manifest.provenance["calibration"]["fingerprint"]


def test_calibrate_in_place_keep_default_and_bad_inputs(bundle_copy, tmp_path, capsys):
    from calibration.cli import calibrate_main
    from runtime.bundle.load import load_bundle

    assert (
        calibrate_main(
            [
                str(bundle_copy),
                "--size",
                "16",
                "--threads",
                "1",
                "--method",
                "minmax",
                "--keep-default",
                "--limit",
                "20",
            ]
        )
        == 0
    )
    m = load_bundle(bundle_copy).manifest
    assert m.default_artifact == "fp32" and "int8" in m.artifacts and m.metrics["int8"]["n"] == 20
    assert calibrate_main([str(tmp_path / "nope"), "--threads", "1"]) == 1
    assert "no such bundle directory" in capsys.readouterr().out
    assert calibrate_main([str(bundle_copy), "--run", str(tmp_path), "--threads", "1"]) == 1
    assert "model.json" in capsys.readouterr().out
    assert calibrate_main([str(bundle_copy), "--gate-metric", "auroc", "--size", "8", "--threads", "1"]) == 1
    assert "unknown metric" in capsys.readouterr().out
