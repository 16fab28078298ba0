"""The accuracy gate and the float-fallback search, as units and through `defectscope calibrate`."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")


def _metrics(acc, f1, recalls=(1.0, 1.0), n=100, split="test"):
    from calibration.evaluate import Metrics

    return Metrics(
        split=split, n=n, accuracy=acc, macro_f1=f1, per_class_recall={"defect": recalls[0], "ok": recalls[1]}
    )


def test_gate_budget_in_points():
    from calibration.gate import check_gate

    ref = _metrics(0.95, 0.94)
    assert check_gate(ref, _metrics(0.94, 0.935), budget=1.0).passed  # exactly 1 point: ok
    g = check_gate(ref, _metrics(0.93, 0.94), budget=1.0)
    assert not g.passed and g.failures == ["accuracy"] and g.drops["accuracy"] == pytest.approx(2.0)
    assert check_gate(ref, _metrics(0.93, 0.94), budget=2.5).passed
    assert check_gate(ref, _metrics(0.97, 0.96), budget=0.0).passed  # INT8 better: fine
    recall = check_gate(ref, _metrics(0.95, 0.94, (0.9, 1.0)), 1.0, ["accuracy", "recall:defect"])
    assert recall.failures == ["recall:defect"]
    text = recall.report()
    assert "FAILED" in text and "recall:defect" in text and "+10.00" in text
    with pytest.raises(KeyError, match="unknown metric"):
        check_gate(ref, ref, 1.0, ["auroc"])
    with pytest.raises(ValueError, match="same split"):
        check_gate(ref, _metrics(0.9, 0.9, split="val"))


def test_search_finds_an_irreducible_set():
    from calibration.fallback import search_float_nodes
    from calibration.gate import check_gate

    order = [f"n{i}" for i in range(20)]
    needed = {"n1", "n7"}  # the gate passes iff both are float
    calls = []

    def evaluate(nodes):
        calls.append(nodes)
        ok = needed <= set(nodes)
        return check_gate(_metrics(0.95, 0.95), _metrics(0.95 if ok else 0.80, 0.95 if ok else 0.80))

    result = search_float_nodes(order, evaluate, max_nodes=16)
    assert result.found and set(result.float_nodes) == needed and result.gate.passed
    # Memoised (no set evaluated twice): 6 growing prefixes + 2 bisection steps + 7 eliminations.
    assert len(calls) == len({frozenset(c) for c in calls}) <= 16
    assert [t.passed for t in result.trials].count(True) >= 1

    none = search_float_nodes(order, evaluate, max_nodes=5)  # n7 is beyond the limit
    assert not none.found and none.float_nodes is None and len(none.trials) >= 1


@pytest.fixture(scope="module")
def outlier_bundle(tmp_path_factory, outlier_run_dir):
    from calibration.cli import export_main

    out = tmp_path_factory.mktemp("outlier") / "bundle"
    assert export_main([str(outlier_run_dir), "--out", str(out), "--name", "outlier", "--threads", "1"]) == 0
    return out


def test_miscalibrated_model_fails_the_gate(exported, tmp_path, capsys):
    """Calibrating on the wrong images (black frames) must be caught, with a report and no change."""
    from calibration.cli import EXIT_GATE, calibrate_main

    black = tmp_path / "black"
    black.mkdir()
    for i in range(8):
        cv2.imwrite(str(black / f"{i}.png"), np.zeros((40, 40), np.uint8))
    before = (exported / "manifest.json").read_bytes()
    report = tmp_path / "report.json"
    rc = calibrate_main(
        [
            str(exported),
            "--calibration-data",
            str(black),
            "--no-fallback",
            "--method",
            "minmax",
            "--threads",
            "1",
            "--report",
            str(report),
            "--float-prefix",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert rc == EXIT_GATE
    assert "accuracy gate failed" in out and "FAIL" in out
    assert (exported / "manifest.json").read_bytes() == before
    data = json.loads(report.read_text())
    cpu = data["targets"]["cpu"]
    assert cpu["passed"] is False and cpu["gate"]["drops_points"]["accuracy"] > 1.0
    assert data["calibration"]["source"].startswith("directory")


def test_fallback_keeps_the_fewest_layers_in_float(outlier_bundle, tmp_path, capsys):
    from calibration.cli import calibrate_main
    from calibration.quantize import compute_nodes, stem_and_classifier
    from runtime.bundle.load import load_bundle

    report = tmp_path / "report.json"
    out = tmp_path / "int8"
    rc = calibrate_main(
        [
            str(outlier_bundle),
            "--out",
            str(out),
            "--size",
            "32",
            "--method",
            "minmax",
            "--threads",
            "1",
            "--report",
            str(report),
            "--float-prefix",
            "0",
        ]
    )
    assert rc == 0, capsys.readouterr().out
    b = load_bundle(out)
    q = b.manifest.artifacts["int8"].quantization
    stem, classifier = stem_and_classifier(b.artifact_path("fp32"))
    stage1 = compute_nodes(b.artifact_path("fp32"))[1]
    assert stage1.op_type == "Conv" and "stage1" in stage1.name
    # The stem conv writes the outlier channel; the stage-1 conv reads it. Both, and nothing else.
    assert q["float_nodes"] == [stem, stage1.name]
    assert q["fallback"]["drops_before_points"]["accuracy"] > 20 and q["fallback"]["trials"] >= 3
    assert b.manifest.metrics["int8"]["gate"]["passed"] is True
    assert b.manifest.default_artifact == "int8"
    data = json.loads(report.read_text())
    search = data["targets"]["cpu"]["search"]
    assert search["found"] and search["candidates_ranked"][:2] == [stem, classifier]
    assert search["trials"][0]["passed"] is False  # [stem] alone does not fix it
    first = data["targets"]["cpu"]["search"]["trials"]
    assert any(t["passed"] for t in first)
    # The outlier makes the plain INT8 model useless: that is why the search ran.
    drops = [t["drops_points"]["accuracy"] for t in first if not t["passed"]]
    assert max(drops) > 20


def test_fallback_gives_up_beyond_max_float_nodes(outlier_bundle, tmp_path, capsys):
    from calibration.cli import EXIT_GATE, calibrate_main

    rc = calibrate_main(
        [
            str(outlier_bundle),
            "--out",
            str(tmp_path / "x"),
            "--size",
            "32",
            "--method",
            "minmax",
            "--threads",
            "1",
            "--max-float-nodes",
            "1",
            "--float-prefix",
            "0",
        ]
    )
    # --float-prefix 0: a timed float prefix (machine-dependent) could keep the outlier layer in float
    assert rc == EXIT_GATE
    assert "no set of up to 1 float layers" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()


# ---- per-backend gates (--gate-backends) ------------------------------------------------------------
def _have_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


needs_ov = pytest.mark.skipif(
    not _have_openvino(), reason="openvino is not installed (extra 'openvino'; make test installs it)"
)


def test_gate_backends_list_is_parsed_and_bad_names_refused():
    import argparse

    from calibration.gate import gate_backends_arg, parse_gate_backends

    assert parse_gate_backends("onnxruntime") == ("onnxruntime",)
    assert parse_gate_backends("onnxruntime, openvino:bf16,openvino:bf16") == ("onnxruntime", "openvino:bf16")
    for bad in ("tensorrt", "openvino:f16", "onnxruntime:f32", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="unknown backend"):
            gate_backends_arg(bad)
    if _have_openvino():
        ids = parse_gate_backends("onnxruntime,openvino")
        assert ids[:2] == ("onnxruntime", "openvino:f32") and set(ids) <= {
            "onnxruntime",
            "openvino:f32",
            "openvino:bf16",
        }


@needs_ov
def test_gate_backends_scores_each_engine_against_the_fp32_reference(exported, splits):
    from calibration.calibset import preprocess_paths
    from calibration.gate import backend_rows, gate_backends
    from calibration.pipeline import EvalData
    from runtime.bundle.load import load_bundle

    b = load_bundle(exported)
    fp32 = b.artifact_path("fp32")
    data = EvalData(
        x=preprocess_paths([s.path for s in splits.test], b.manifest.input),
        y=[s.label for s in splits.test],
        classes=splits.classes,
        split="test",
        threads=1,
        batch_size=16,
    )
    ref = data.evaluate(fp32)
    records = gate_backends(("onnxruntime", "openvino:f32"), {"fp32": fp32}, ref, data, "logits", budget=0.5)
    ov = records["fp32"]["openvino:f32"]
    assert ov["inference_precision"] == "f32" and ov["openvino"] and ov["n"] == len(splits.test)
    assert ov["gate"]["passed"] is True and abs(ov["accuracy"] - ref.accuracy) <= 1 / len(splits.test)
    assert records["fp32"]["onnxruntime"]["gate"]["drops_points"]["accuracy"] == 0.0
    # A reference the engine cannot reach (forged 5 points higher) fails, naming the metric.
    from dataclasses import replace

    high = replace(ref, accuracy=min(1.0, ref.accuracy + 0.05) if ref.accuracy <= 0.95 else 1.0)
    if high.accuracy > ov["accuracy"] + 0.005:
        failing = gate_backends(("openvino:f32",), {"fp32": fp32}, high, data, "logits", budget=0.5)
        assert failing["fp32"]["openvino:f32"]["gate"]["failed"] == ["accuracy"]
        assert backend_rows(failing)[0][-1] == "FAIL"


@needs_ov
def test_calibrate_records_per_backend_metrics_and_auto_reads_them(exported, tmp_path, capsys):
    from calibration.cli import calibrate_main
    from runtime.bundle.load import load_bundle
    from runtime.config.station import ModelConfig
    from runtime.inference.selection import accuracy_record, create_backend

    out = tmp_path / "gated"
    assert (
        calibrate_main(
            [
                str(exported),
                "--out",
                str(out),
                "--size",
                "16",
                "--threads",
                "1",
                "--method",
                "minmax",
                "--float-prefix",
                "0",
                "--gate-backends",
                "onnxruntime,openvino:f32",
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert "per-backend accuracy gate" in capsys.readouterr().out
    b = load_bundle(out)
    for key in ("fp32", "int8"):
        per = b.manifest.metrics[key]["backends"]
        assert set(per) == {"onnxruntime", "openvino:f32"}
        assert all(r["gate"]["split"] == "test" and "passed" in r["gate"] for r in per.values())
    assert json.loads((tmp_path / "r.json").read_text())["backends"]["int8"]["openvino:f32"]["n"] > 0
    rec = accuracy_record(b, "int8", "openvino:f32")
    backend = create_backend(b, ModelConfig(bundle=b.path, backend="openvino"))
    assert backend.selection.accuracy == rec and backend.artifact_key == "int8"
