"""Detection INT8: QDQ by scope on a tiny Faster R-CNN, gated on mAP@.5, the fastest passing scope kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")
pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    """(run dir, bundle dir) of a tiny detector trained a few steps on squares, exported by `defectscope export`."""
    from defectscope.cli import main as ds_main
    from tests.training.detection.conftest import TINY, write_squares_coco

    root = write_squares_coco(tmp_path_factory.mktemp("detq") / "coco", ("square", "bar"))
    run, bundle = root.parent / "run", root.parent / "bundle"
    assert (
        ds_main(
            [
                "train",
                "--data",
                str(root / "train.json"),
                "--out",
                str(run),
                "--epochs",
                "2",
                "--max-steps-per-epoch",
                "2",
                *TINY,
            ]
        )
        == 0
    )
    assert ds_main(["export", str(run), "--out", str(bundle), "--threads", "2", "--parity-images", "2"]) == 0
    return run, bundle


def _card(run: Path):
    from training.detection.checkpoint import DetCard

    return DetCard.from_dict(json.loads((run / "model.json").read_text()))


def test_scopes_pick_the_parts_of_the_graph(tiny_detector):
    from calibration.quantize_detection import scope_nodes

    _, bundle = tiny_detector
    model = bundle / "model.onnx"
    every = set(scope_nodes(model, "all"))
    assert (
        set(scope_nodes(model, "backbone"))
        < set(scope_nodes(model, "backbone_fpn"))
        < set(scope_nodes(model, "convs"))
        < every
    )
    assert all("/backbone/body/" in n for n in scope_nodes(model, "backbone"))
    assert {n for n in every if "box_head" in n} and not {n for n in every if "box_predictor" in n}
    with pytest.raises(Exception, match="expected one of"):
        scope_nodes(model, "heads")


def test_chosen_passing_scope_is_written_and_a_failed_gate_writes_nothing(tiny_detector, tmp_path):
    import onnx

    from calibration.detection_bundle import held_out_samples
    from calibration.quantize_detection import calibrate_detector, choose_trial

    run, bundle = tiny_detector
    card = _card(run)
    held = held_out_samples(card, "test", None)
    dest = tmp_path / "int8.onnx"
    r = calibrate_detector(
        bundle / "model.onnx",
        card,
        held,
        dest,
        score_threshold=0.05,
        size=8,
        scopes=("convs", "backbone"),
        float_prefixes=(0, 2),
        threads=2,
        echo=lambda s: None,
    )
    # Largest scope first (one calibration covers both), each with and without the float prefix.
    assert [(t.scope, t.float_prefix) for t in r.trials] == [
        ("convs", 0),
        ("convs", 2),
        ("backbone", 0),
        ("backbone", 2),
    ]
    assert r.trials[1].nodes == r.trials[0].nodes - 2
    assert r.passed and r.chosen in r.trials and r.chosen.passed
    assert r.chosen == choose_trial(r.trials)[0]
    ops = {n.op_type for n in onnx.load(str(dest)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # A budget nothing can meet (INT8 must be 100 points BETTER): refused, nothing written.
    none = tmp_path / "none.onnx"
    r2 = calibrate_detector(
        bundle / "model.onnx",
        card,
        held,
        none,
        score_threshold=0.05,
        size=8,
        scopes=("backbone",),
        float_prefixes=(0,),
        budget=-100.0,
        threads=2,
        echo=lambda s: None,
    )
    assert not r2.passed and r2.artifact is None and not none.exists()
    assert r2.trials[0].drop_points > -100.0


def test_calibrate_cli_adds_the_gated_int8_artifact_to_a_detection_bundle(tiny_detector, tmp_path, capsys):
    import shutil

    from defectscope.cli import main as ds_main
    from runtime.bundle.load import load_bundle
    from runtime.fsio import sha256_file

    run, src = tiny_detector
    bundle = tmp_path / "bundle"
    shutil.copytree(src, bundle)
    report = tmp_path / "calib.json"
    # Classifier-only options are refused on a detection bundle, not ignored.
    assert ds_main(["calibrate", str(bundle), "--run", str(run), "--target", "tensorrt"]) == 1
    assert (
        ds_main(["calibrate", str(bundle), "--run", str(run), "--size", "8", "--threads", "2", "--report", str(report)])
        == 0
    )
    b = load_bundle(bundle)  # checksums and graph I/O verified, like a station does
    m = b.manifest
    assert m.default_artifact == "int8" and m.artifacts["int8"].file == "model.int8.onnx"
    q = dict(m.artifacts["int8"].quantization or {})
    assert q["scope"] in ("all", "convs", "backbone_fpn", "backbone") and q["quantized_nodes"] > 0
    assert len(q["scope_trials"]) == 4 * 2 and "box_predictor" in q["float_parts"]  # 4 scopes x 2 float prefixes
    assert q["float_prefix"] in (0, 2)
    gate = m.metrics["int8"]["gate"]
    assert gate["passed"] and gate["metric"] == "map50" and gate["budget_points"] == 1.0
    assert m.files["model.int8.onnx"] == sha256_file(bundle / "model.int8.onnx")
    rep = json.loads(report.read_text())
    assert (
        rep["chosen"] == q["trial"] == (q["scope"] if not q["float_prefix"] else f"{q['scope']}-f{q['float_prefix']}")
    )
    # Chosen on val, reported (and gated again) on test: the last line names the trial exactly.
    assert gate["split"] == "test" and gate["chosen_on"]["split"] == "val" and rep["report"]["split"] == "test"
    assert q["chosen_on"] == "val"
    last = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()][-1]
    assert f"INT8 artifact added (trial {q['trial']}," in last and "chosen on val): test mAP@.5" in last
    # Nothing meets a budget of -100 points: exit 3, the bundle untouched.
    before = (bundle / "manifest.json").read_bytes()
    assert ds_main(["calibrate", str(bundle), "--run", str(run), "--size", "8", "--budget", "-100"]) == 3
    assert (bundle / "manifest.json").read_bytes() == before


def test_calibrate_refuses_a_tampered_detection_bundle(tiny_detector, tmp_path):
    import shutil

    from defectscope.cli import main as ds_main

    run, src = tiny_detector
    bundle = tmp_path / "bundle"
    shutil.copytree(src, bundle)
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")  # the checksum no longer matches: never quantize (or ship) an unverified graph
    assert ds_main(["calibrate", str(bundle), "--run", str(run), "--size", "4"]) == 1
    assert not (bundle / "model.int8.onnx").exists()


def test_gate_backends_records_openvino_per_artifact_and_auto_reads_them(tiny_detector, tmp_path):
    """`calibrate --gate-backends onnxruntime,openvino:f32` on a detector: mAP records per engine; a failing
    record makes `auto` refuse that backend (the station never serves an engine that lost mAP)."""
    pytest.importorskip("openvino")
    import shutil

    from defectscope.cli import main as ds_main
    from runtime.bundle.load import load_bundle
    from runtime.inference.selection import accuracy_record, accuracy_refusal

    run, src = tiny_detector
    bundle = tmp_path / "bundle"
    shutil.copytree(src, bundle)
    assert (
        ds_main(
            [
                "calibrate",
                str(bundle),
                "--run",
                str(run),
                "--size",
                "8",
                "--threads",
                "2",
                "--gate-backends",
                "onnxruntime,openvino:f32",
            ]
        )
        == 0
    )
    b = load_bundle(bundle)
    for key in ("fp32", "int8"):
        rec = b.manifest.metrics[key]["backends"]
        assert set(rec) == {"onnxruntime", "openvino:f32"}
        ov = rec["openvino:f32"]
        assert ov["gate"]["metric"] == "map50" and ov["inference_precision"] == "f32" and "openvino" in ov
        assert accuracy_record(b, key, "openvino:f32") == ov
        assert (accuracy_refusal(ov) is None) == ov["gate"]["passed"]
    # A forged failing record is what auto reads: refused, with the budget and the drop in the reason.
    forged = {
        "gate": {
            **b.manifest.metrics["int8"]["backends"]["openvino:f32"]["gate"],
            "passed": False,
            "drops_points": {"map50": 3.06},
            "failed": ["map50"],
        }
    }
    assert "fails the budget" in accuracy_refusal(forged) and "map50 -3.06" in accuracy_refusal(forged)


def test_calibrate_refuses_a_run_whose_classes_are_not_the_bundles(tiny_detector, tmp_path):
    """A --run from another model (forged or mistaken card) is refused naming the card; nothing written."""
    import shutil

    from defectscope.cli import main as ds_main

    run, src = tiny_detector
    bundle, other = tmp_path / "bundle", tmp_path / "run"
    shutil.copytree(src, bundle)
    shutil.copytree(run, other)
    card = json.loads((other / "model.json").read_text())
    card["classes"] = card["detector"]["classes"] = ["crack", "pit"]
    (other / "model.json").write_text(json.dumps(card))
    before = (bundle / "manifest.json").read_bytes()
    assert ds_main(["calibrate", str(bundle), "--run", str(other), "--size", "4"]) == 1
    (other / "model.json").write_text("{not json")
    assert ds_main(["calibrate", str(bundle), "--run", str(other), "--size", "4"]) == 1
    assert (bundle / "manifest.json").read_bytes() == before and not (bundle / "model.int8.onnx").exists()


def test_calibrate_adds_an_int8_uint8_input_twin_to_a_uint8_detection_bundle(tiny_detector, tmp_path):
    """A detection bundle exported with --uint8-input gets ``int8-u8`` next to ``int8`` at calibration:
    the same INT8 graph behind the in-graph normalisation, parity-checked and recorded."""
    from defectscope.cli import main as ds_main
    from runtime.bundle.load import load_bundle

    run, _ = tiny_detector
    bundle = tmp_path / "bundle"
    export = ["export", str(run), "--out", str(bundle), "--threads", "2", "--parity-images", "2"]
    assert ds_main([*export, "--uint8-input"]) == 0
    assert ds_main(["calibrate", str(bundle), "--run", str(run), "--size", "8", "--threads", "2"]) == 0
    m = load_bundle(bundle).manifest
    assert m.artifacts["int8-u8"].input == "uint8_nhwc" and m.artifacts["int8-u8"].precision == "int8"
    assert m.metrics["int8-u8"]["uint8_parity"]["passed"] is True
    assert m.default_artifact == "int8"  # the default stays the float-input artifact (no measured reason to move)


def _trial(label: str, drop: float, ms: float, passed: bool = True):
    from calibration.quantize_detection import ScopeTrial

    scope, _, f = label.partition("-f")
    return ScopeTrial(scope, 10, 0.9, 0.5, drop, ms, passed, {}, int(f or 0))


def test_near_tie_prefers_the_more_accurate_trial_and_says_the_trade():
    from calibration.quantize_detection import choose_trial

    # Issue 27's case: 0.89 vs 0.14 points for 1.5 ms.
    chosen, note = choose_trial([_trial("all-f2", 0.89, 30.0), _trial("convs", 0.14, 31.5)])
    assert chosen.label == "convs" and "convs over the fastest all-f2" in note and "+1.50 ms" in note
    # Beyond the near-tie margin speed wins, silently; failing trials never count.
    chosen, note = choose_trial(
        [_trial("all", 0.89, 30.0), _trial("convs", 0.14, 40.0), _trial("backbone", 0.0, 30.5, False)]
    )
    assert chosen.label == "all" and note == ""
    # A near-tie whose accuracy edge is noise (< 0.25 points) does not beat the fastest.
    assert choose_trial([_trial("all", 0.30, 30.0), _trial("convs", 0.20, 30.5)])[0].label == "all"
    assert choose_trial([_trial("all", 5.0, 30.0, False)]) == (None, "")
