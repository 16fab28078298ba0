"""Detection bundles on the station side: manifest keys, letterbox preprocessing, the box
postprocessor (flip TTA + fusion, original pixels), the box decision, schema-2 messages,
annotated snapshots and the viewer's box columns. Real ONNX Runtime sessions on a tiny
blob detector (tests/runtime/_detection.py)."""

from __future__ import annotations

import copy
import json
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from runtime.bundle.load import load_bundle
from runtime.bundle.manifest import BundleError, Manifest
from runtime.bundle.output import check_output_shapes
from runtime.config.station import ConfigError, DecisionConfig, SnapshotConfig, from_dict
from runtime.inference.boxes import fit, geometry
from runtime.inference.decision import make_postprocessor
from runtime.inference.preprocess import InputSpec, Preprocessor, SpecError
from runtime.serving.messages import MAX_DETECTIONS, SchemaError, validate, verdict_message
from runtime.serving.snapshots import SnapshotSpool
from runtime.tools.viewer import ViewerState, render

from ._detection import CLASSES, SIZE, blob_image, detection_manifest_dict, make_detection_bundle
from ._helpers import manifest_dict


@pytest.fixture(scope="module")
def det_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_detection_bundle(tmp_path_factory.mktemp("det") / "bundle")


# ---- manifest ---------------------------------------------------------------------------------------
def test_detection_manifest_round_trips_and_classifier_manifests_are_unchanged() -> None:
    data = detection_manifest_dict()
    m = Manifest.from_dict(data)
    assert m.input.resize_policy == "letterbox" and m.input.pad_value == 0
    assert (m.output.box_format, m.output.score_threshold, m.output.max_detections) == ("xyxy", 0.5, 2)
    out = m.to_dict()
    assert out["output"] == data["output"] and out["input"]["pad_value"] == 0
    assert Manifest.from_dict(out) == m
    cls = Manifest.from_dict(manifest_dict()).to_dict()
    assert "pad_value" not in cls["input"] and cls["output"] == {"kind": "logits", "names": ["logits"]}


def test_training_export_manifest_is_accepted() -> None:
    """The keys training/detection/export.py writes (letterbox, pad_value, resize_size = max side)."""
    data = detection_manifest_dict()
    data["input"].update(height=24, width=40, resize_size=40)
    data["output"].update(score_threshold=0.35, max_detections=100)
    m = Manifest.from_dict(data)
    assert (m.input.height, m.input.width, m.output.max_detections) == (24, 40, 100)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("output", "box_format", "yxyx"),
        ("output", "box_format", 7),
        ("output", "score_threshold", -0.1),
        ("output", "score_threshold", math.nan),
        ("output", "score_threshold", 1.5),
        ("output", "score_threshold", True),
        ("output", "score_threshold", "0.5"),
        ("output", "max_detections", 0),
        ("output", "max_detections", -3),
        ("output", "max_detections", MAX_DETECTIONS + 1),
        ("output", "max_detections", 10**12),
        ("output", "max_detections", 2.5),
        ("output", "max_detections", True),
        ("input", "pad_value", 256),
        ("input", "pad_value", -1),
        ("input", "pad_value", 1.5),
        ("input", "pad_value", math.nan),
        ("input", "resize_policy", "shorter_side_center_crop"),
        ("input", "resize_policy", "fill"),
    ],
)
def test_forged_detection_keys_are_refused_naming_the_key(section: str, key: str, value: object) -> None:
    data = detection_manifest_dict()
    if key == "resize_policy":
        del data["input"]["pad_value"]  # a letterbox key
    data[section][key] = value
    with pytest.raises(BundleError, match=f"{section}.{key}"):
        Manifest.from_dict(data)


def test_box_format_is_required_and_classifiers_take_no_detection_keys() -> None:
    data = detection_manifest_dict()
    del data["output"]["box_format"]
    with pytest.raises(BundleError, match="output.box_format': missing"):
        Manifest.from_dict(data)
    for section, key, value in [
        ("output", "max_detections", 10),
        ("output", "box_format", "xyxy"),
        ("input", "resize_policy", "letterbox"),
        ("input", "pad_value", 0),
    ]:
        data = manifest_dict()
        data[section][key] = value
        with pytest.raises(BundleError, match=f"{section}.{key}"):
            Manifest.from_dict(data)


def test_output_shapes_are_checked_against_the_graph(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="max_detections is 3"):
        make_detection_bundle(tmp_path / "b", max_detections=3)  # the graph holds 2 per image
    out = Manifest.from_dict(detection_manifest_dict()).output

    def io(*shapes: list) -> list:
        return [SimpleNamespace(name=n, shape=s) for n, s in zip(("boxes", "scores", "labels"), shapes)]

    check_output_shapes("detection", out, 3, io(["N", 2, 4], ["N", 2], ["N", 2]), "g")
    check_output_shapes("detection", out, 3, io(["N", "D", 4], ["N", "D"], ["N", "D"]), "g")  # symbolic: fine
    for shapes, match in [
        ((["N", 2, 5], ["N", 2], ["N", 2]), "'boxes'"),
        ((["N", 2], ["N", 2], ["N", 2]), "'boxes'"),
        ((["N", 2, 4], ["N", 2, 1], ["N", 2]), "'scores'"),
        ((["N", 2, 4], ["N", 3], ["N", 2]), "disagree"),
        ((["N", 5000, 4], ["N", 5000], ["N", 5000]), "more than"),
        (([1, 2, 4], [2, 2], [1, 2]), "disagree"),
    ]:
        with pytest.raises(BundleError, match=match):
            check_output_shapes("detection", out, 3, io(*shapes), "g")


# ---- preprocessing ------------------------------------------------------------------------------------
def test_letterbox_preprocessing_is_runtime_boxes_fit(det_bundle: Path) -> None:
    spec = load_bundle(det_bundle).manifest.input
    pre = Preprocessor(spec)
    img = blob_image(48, 64, (16, 8, 40, 24))
    x = pre(img)
    fitted, geo = fit(img, SIZE, SIZE, "letterbox")
    np.testing.assert_allclose(x, fitted[:, :, ::-1].transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert geo == pre.box_geometry(48, 64) == geometry(48, 64, SIZE, SIZE, "letterbox")
    assert (geo.pad_x, geo.pad_y, geo.scale_x) == (0.0, 4.0, 0.5)
    assert np.all(x[:, :4] == 0) and np.all(x[:, 28:] == 0)  # the pad rows (pad_value 0)
    gray = Preprocessor(InputSpec.from_dict({**spec.to_dict(), "pad_value": 255}))(img[:, :, 0])
    assert np.all(gray[:, :4] == 1.0)
    center = Preprocessor(InputSpec(height=32, width=32, resize_size=32))
    assert center.box_geometry(48, 64) is None
    with pytest.raises(SpecError, match="input.pad_value"):
        InputSpec(height=32, width=32, resize_size=32, pad_value=0)  # not a letterbox spec


# ---- postprocessing ----------------------------------------------------------------------------------
def _post(**output: object):
    data = detection_manifest_dict(**output)
    m = Manifest.from_dict(data)
    return m, make_postprocessor(m, ("original", "hflip", "vflip"))


def test_flip_views_are_unflipped_fused_and_mapped_to_original_pixels() -> None:
    m, post = _post(max_detections=3)
    w = h = SIZE
    box = np.array([4, 8, 12, 20], np.float32)
    views = [box, np.array([w - 12, 8, w - 4, 20]), np.array([4, h - 20, 12, h - 8])]
    boxes = np.zeros((3, 3, 4), np.float32)
    scores = np.zeros((3, 3), np.float32)
    labels = np.zeros((3, 3), np.int64)
    for v, b in enumerate(views):
        boxes[v, 0], scores[v, 0], labels[v, 0] = b, 0.9, 1
    boxes[0, 1], scores[0, 1], labels[0, 1] = [20, 20, 30, 30], 0.6, 2  # seen in one view of three
    geo = geometry(48, 64, SIZE, SIZE, "letterbox")
    (pred,) = post([boxes, scores, labels], 1, 3, [geo])
    b = pred.boxes
    assert b.labels.tolist() == [1, 2]
    np.testing.assert_allclose(b.boxes[0], geo.to_original(box[None])[0], atol=1e-4)
    np.testing.assert_allclose(b.scores, [0.9, 0.2], atol=1e-6)
    np.testing.assert_allclose(b.boxes[1], [40, 32, 60, 48])  # (30 - 4) / 0.5 = 52 > 48: clipped to the image
    np.testing.assert_allclose(pred.scores, [0.1, 0.9, 0.2], atol=1e-6)


def test_forged_model_outputs_never_become_boxes() -> None:
    m, _ = _post(max_detections=None)
    post = make_postprocessor(m)
    rows = [
        ([1, 1, 5, 5], math.nan, 1),
        ([1, 1, 5, 5], 0.9, 7),
        ([1, 1, 5, 5], 0.9, -1),
        ([math.inf, 1, 5, 5], 0.9, 1),
        ([1, 1, 5, 5], 2.0, 1),
        ([1, 1, 5, 5], 0.9, 0),  # 0 = good / padding
        ([6, 6, 2, 2], 0.9, 1),
        ([1, 1, 5, 5], 0.9, 1.5),
        ([2, 2, 6, 6], 0.8, 2.0),
    ]
    boxes = np.array([[r[0] for r in rows]], np.float32)
    scores = np.array([[r[1] for r in rows]], np.float32)
    labels = np.array([[r[2] for r in rows]], np.float64)  # a float label must be integral
    (pred,) = post([boxes, scores, labels], 1, 1)
    assert pred.boxes.labels.tolist() == [2] and pred.boxes.scores.tolist() == pytest.approx([0.8])
    with pytest.raises(ValueError, match="expected"):
        post([boxes[:, :, :3], scores, labels], 1, 1)


def test_boxes_are_capped_at_max_detections_by_score() -> None:
    m, _ = _post(max_detections=2)
    post = make_postprocessor(m)
    boxes = np.tile(np.array([0, 0, 4, 4], np.float32), (1, 5, 1)) + np.arange(5, dtype=np.float32)[None, :, None] * 5
    scores = np.array([[0.3, 0.9, 0.5, 0.7, 0.6]], np.float32)
    (pred,) = post([boxes, scores, np.ones((1, 5), np.int64)], 1, 1)
    assert pred.boxes.scores.tolist() == pytest.approx([0.9, 0.7])


def test_detection_tta_takes_flips_only_and_no_adaptive_mode(tmp_path: Path, det_bundle: Path) -> None:
    m = Manifest.from_dict(detection_manifest_dict())
    for views in (("original", "rot90"), ("original", "scale:1.1"), ("original", "transpose")):
        with pytest.raises(ConfigError, match="key 'tta.views'"):
            make_postprocessor(m, views)
    assert make_postprocessor(m, ("original", "hflip", "vflip", "rot180")).supports_tta
    from runtime.inference.model import ModelLoadError, load_model

    cfg = from_dict(
        {
            "station": "s",
            "cameras": [{"id": "c", "source": str(tmp_path)}],
            "model": {"bundle": str(det_bundle), "backend": "onnxruntime-cpu", "warmup_runs": 0},
            "tta": {"views": ["original", "hflip"], "mode": "uncertain"},
        },
        base=tmp_path,
    )
    with pytest.raises(ModelLoadError, match="key 'tta.mode'"):
        load_model(cfg)


# ---- decision ----------------------------------------------------------------------------------------
def _pred(boxes: list, scores: list, labels: list, **output: object):
    m = Manifest.from_dict(detection_manifest_dict(max_detections=8, **output))
    post = make_postprocessor(m)
    b = np.zeros((1, 8, 4), np.float32)
    s = np.zeros((1, 8), np.float32)
    lab = np.zeros((1, 8), np.int64)
    if boxes:
        b[0, : len(boxes)], s[0, : len(scores)], lab[0, : len(labels)] = boxes, scores, labels
    return m, post, post([b, s, lab], 1, 1)[0]


def test_box_decision_reads_the_decision_keys() -> None:
    m, post, pred = _pred([[0, 0, 4, 4], [10, 10, 20, 20], [0, 0, 30, 30]], [0.95, 0.55, 0.3], [1, 2, 1])
    d = post.decider(DecisionConfig()).decide(pred)  # threshold: the bundle's score_threshold 0.5, band 0.1
    assert (d.verdict, d.defect_class) == ("defect", "scratch")
    assert [x["class"] for x in d.detections] == ["scratch", "stain"]  # the 0.3 box is below 0.5 - 0.1
    d = post.decider(DecisionConfig(min_box_area=20.0)).decide(pred)  # the 4x4 box no longer counts
    assert (d.verdict, d.defect_class, len(d.detections)) == ("uncertain", "stain", 1)
    d = post.decider(DecisionConfig(thresholds={"scratch": 0.99, "stain": 0.9})).decide(pred)
    assert (d.verdict, [x["class"] for x in d.detections]) == ("uncertain", ["scratch"])
    d = post.decider(DecisionConfig(default_threshold=0.2, uncertain_band=0.0)).decide(pred)
    assert d.verdict == "defect" and len(d.detections) == 3
    _, post, pred = _pred([[0, 0, 4, 4]], [0.75], [1], score_threshold=0.8)
    d = post.decider(DecisionConfig()).decide(pred)
    assert d.verdict == "uncertain"  # 0.75 is within 0.1 of the bundle's 0.8
    _, post, pred = _pred([], [], [])
    assert post.decider(DecisionConfig()).decide(pred).verdict == "ok"
    for cfg, key in [
        (DecisionConfig(thresholds={"ok": 0.5}), "decision.thresholds.ok"),
        (DecisionConfig(thresholds={"crack": 0.5}), "decision.thresholds.crack"),
        (DecisionConfig(uncertain_band=0.5), "decision.uncertain_band"),
        (DecisionConfig(good_classes=tuple(CLASSES)), "decision.good_classes"),
    ]:
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            post.decider(cfg)


def test_min_box_area_in_the_station_config(tmp_path: Path) -> None:
    base = {"station": "s", "cameras": [{"id": "c", "source": str(tmp_path)}], "model": {"bundle": "b"}}
    assert from_dict({**base, "decision": {"min_box_area": 12.5}}, base=tmp_path).decision.min_box_area == 12.5
    assert from_dict(base, base=tmp_path).decision.default_threshold is None
    for bad in (-1, "big", True):
        with pytest.raises(ConfigError, match="key 'decision.min_box_area'"):
            from_dict({**base, "decision": {"min_box_area": bad}}, base=tmp_path)


# ---- messages ----------------------------------------------------------------------------------------
def _det_msg(detections: list | None = None) -> dict:
    return verdict_message(
        station="s",
        camera="c",
        seq=1,
        source=None,
        captured_at=1.0,
        published_at=1.1,
        model={"name": "m", "version": "1", "precision": "fp32", "artifact": "fp32", "backend": "onnxruntime-cpu"},
        task="detection",
        scores={"ok": 0.1, "scratch": 0.9, "stain": 0.0},
        top_class="scratch",
        top_score=0.9,
        verdict="defect",
        defect_class="scratch",
        confidence=0.9,
        latency_ms={"queue": 0.1, "preprocess": 0.2, "inference": 1.0, "total": 2.0},
        tta_views=1,
        detections=detections
        if detections is not None
        else [{"box": [16.0, 8.0, 40.0, 24.0], "score": 0.9, "class": "scratch"}],
    )


def test_detection_verdicts_are_schema_2_with_the_version_1_fields() -> None:
    msg = _det_msg()
    validate(msg)
    assert msg["schema_version"] == 2
    cls = verdict_message(**{**_verdict_kwargs(), "task": "classification"})
    assert cls["schema_version"] == 1 and "detections" not in cls
    assert set(cls) - {"probabilities"} <= set(msg)  # old subscribers find every field they read
    with pytest.raises(SchemaError, match="'schema_version'"):
        validate({**msg, "schema_version": 1})
    with pytest.raises(SchemaError, match="'schema_version'"):
        validate({**cls, "schema_version": 2})
    with pytest.raises(SchemaError, match="'schema_version'"):
        validate({**msg, "schema_version": 3})
    validate(_det_msg([]))


def _verdict_kwargs() -> dict:
    return dict(
        station="s",
        camera="c",
        seq=1,
        source=None,
        captured_at=1.0,
        published_at=1.1,
        model={"name": "m", "version": "1", "precision": "fp32", "artifact": "fp32", "backend": "x"},
        task="classification",
        scores={"ok": 0.1, "defect": 0.9},
        top_class="defect",
        top_score=0.9,
        verdict="defect",
        defect_class="defect",
        confidence=0.9,
        latency_ms={"queue": 0.1, "preprocess": 0.2, "inference": 1.0, "total": 2.0},
        tta_views=1,
    )


GOOD = {"box": [16.0, 8.0, 40.0, 24.0], "score": 0.9, "class": "scratch"}


@pytest.mark.parametrize(
    ("det", "key"),
    [
        ({**GOOD, "box": [16.0, 8.0, math.nan, 24.0]}, "detections[0].box"),
        ({**GOOD, "box": [16.0, 8.0, math.inf, 24.0]}, "detections[0].box"),
        ({**GOOD, "box": [16.0, 8.0, 40.0]}, "detections[0].box"),
        ({**GOOD, "box": [16.0, 8.0, 40.0, 24.0, 1.0]}, "detections[0].box"),
        ({**GOOD, "box": [-1.0, 8.0, 40.0, 24.0]}, "detections[0].box"),
        ({**GOOD, "box": [40.0, 8.0, 16.0, 24.0]}, "detections[0].box"),
        ({**GOOD, "box": ["16", 8.0, 40.0, 24.0]}, "detections[0].box"),
        ({**GOOD, "box": [True, 8.0, 40.0, 24.0]}, "detections[0].box"),
        ({**GOOD, "box": "16,8,40,24"}, "detections[0].box"),
        ({**GOOD, "score": 1.5}, "detections[0].score"),
        ({**GOOD, "score": math.nan}, "detections[0].score"),
        ({**GOOD, "class": "crack"}, "detections[0].class"),
        ({**GOOD, "class": 1}, "detections[0].class"),
        ({**GOOD, "extra": 1}, "detections[0]"),
        ({"box": GOOD["box"], "score": 0.9}, "detections[0]"),
        ("box", "detections[0]"),
    ],
)
def test_forged_detections_are_refused_naming_the_key(det: object, key: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(f"'{key}")):
        validate(_det_msg([det]))


def test_too_many_or_missing_detections_are_refused() -> None:
    validate(_det_msg([GOOD] * MAX_DETECTIONS))
    with pytest.raises(SchemaError, match="'detections'"):
        validate(_det_msg([GOOD] * (MAX_DETECTIONS + 1)))
    with pytest.raises(SchemaError, match="at most 2"):
        validate(_det_msg([GOOD] * 3), max_detections=2)
    msg = _det_msg()
    del msg["detections"]
    with pytest.raises(SchemaError, match="'detections'"):
        validate(msg)
    # What JSON allows but a box must not be: NaN read back from a message.
    payload = json.dumps(_det_msg()).replace("16.0", "NaN")
    with pytest.raises(SchemaError, match="'detections\\[0\\].box"):
        validate(json.loads(payload))


# ---- snapshots + viewer -------------------------------------------------------------------------------
def test_snapshot_keeps_the_frame_and_adds_an_annotated_copy(tmp_path: Path) -> None:
    spool = SnapshotSpool(SnapshotConfig(enabled=True, dir=tmp_path / "spool", quota_mb=10.0))
    img = blob_image(48, 64, (16, 8, 40, 24))
    msg = _det_msg()
    path = spool.path_for("s", "c", 1, "defect", time.time())
    assert spool.submit(path, img, dict(msg, snapshot=str(path)))
    spool.close()
    clean = cv2.imread(str(path))
    boxed = cv2.imread(str(path.with_name(path.stem + ".boxes.jpg")))
    assert np.abs(clean.astype(int) - img).max() < 40  # the judged frame, no drawing on it
    red = (boxed[:, :, 2] > 150) & (boxed[:, :, 0] < 100) & (boxed[:, :, 1] < 100)
    assert red[8:24, 16].any() and red[8:24, 39].any() and not red[30:, :].any()
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["detections"] == msg["detections"] and sidecar["boxes_image"] == path.stem + ".boxes.jpg"
    # The quota treats the three files as one snapshot (removed together, oldest first).
    total = sum(p.stat().st_size for p in (tmp_path / "spool").iterdir())
    small = SnapshotSpool(SnapshotConfig(enabled=True, dir=tmp_path / "spool", quota_mb=(total - 1) / 2**20))
    small.close()
    assert list((tmp_path / "spool").iterdir()) == []


def test_viewer_shows_classes_and_box_counts() -> None:
    state = ViewerState()
    two = [GOOD, {**GOOD, "box": [0.0, 0.0, 4.0, 4.0]}, {**GOOD, "class": "stain"}]
    assert state.update(_det_msg(two), 1.0)
    assert state.update(dict(_det_msg([]), seq=2, verdict="ok", defect_class=None), 1.5)
    assert state.update(dict(_det_msg([GOOD]), seq=3), 2.0)
    (row,) = state.rows(2.0)
    assert row["boxes"] == "1 scratch" and row["box_counts"] == {"scratch": 3, "stain": 1}
    assert state.events[-1]["boxes"] == "2 scratch, 1 stain"
    from rich.console import Console

    console = Console(width=220, record=True)
    console.print(render(state, 2.0))
    text = console.export_text()
    assert "boxes seen" in text and "3 scratch, 1 stain" in text and "2 scratch, 1 stain" in text
    bad = copy.deepcopy(_det_msg([{**GOOD, "score": 7}]))
    assert not state.update(bad, 3.0) and state.invalid == 1


def test_bundle_inspect_shows_the_detection_output(det_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.bundle.cli import main

    assert main(["inspect", str(det_bundle)]) == 0
    out = capsys.readouterr().out
    assert "detection" in out and "boxes, scores, labels (xyxy, up to 2 per image, score threshold 0.5" in out


def test_a_graph_returning_many_boxes_is_cut_before_fusion() -> None:
    m, _ = _post(max_detections=None)
    post = make_postprocessor(m, ("original", "hflip"))
    n = 20_000  # a symbolic-D graph may return any number of rows
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 28, (2, n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + 4], axis=2)
    scores = rng.uniform(0.1, 1.0, (2, n)).astype(np.float32)
    t = time.perf_counter()
    (pred,) = post([boxes, scores, np.ones((2, n), np.int64)], 1, 2)
    assert len(pred.boxes.scores) <= MAX_DETECTIONS and time.perf_counter() - t < 30
