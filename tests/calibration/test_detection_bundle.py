"""`defectscope export` of a detection run: ONNX parity enforced, detection manifest, ORT metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectscope.cli import main as ds_main

pytest.importorskip("onnxruntime")
pytest.importorskip("pycocotools")
pytest.importorskip("torchvision")


def test_export_detection_bundle(det_run, tmp_path):
    from calibration.detection_bundle import held_out_samples, ort_predict
    from runtime.fsio import sha256_file
    from runtime.inference.boxes import box_iou
    from training.detection.checkpoint import load_detector
    from training.detection.loader import DetectionDataset
    from training.detection.predict import predict

    _, run = det_run
    out = tmp_path / "bundle"
    assert ds_main(["export", str(run), "--out", str(out), "--threads", "2", "--parity-images", "4"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["task"] == "detection" and m["classes"] == ["ok", "square", "bar"]
    assert m["good_classes"] == ["ok"]
    assert m["output"] == {
        "kind": "detections",
        "names": ["boxes", "scores", "labels"],
        "box_format": "xyxy",
        "score_threshold": 0.5,
        "max_detections": 100,
        "fusion_iou": 0.55,
    }
    assert m["input"]["resize_policy"] == "letterbox" and (m["input"]["height"], m["input"]["width"]) == (64, 64)
    assert m["files"]["model.onnx"] == sha256_file(out / "model.onnx")
    par = m["provenance"]["export"]["parity"]
    assert par["images"] == 4 and par["detections"] > 0 and par["min_iou"] >= 0.98 and par["max_score_diff"] <= 1e-3
    assert "map50" in m["metrics"]["fp32"]
    # The bundle's graph gives torch's detections in original pixels (same count above 0.05, same labels).
    model, card = load_detector(run)
    ds = DetectionDataset(held_out_samples(card, "test", 3), card.detector.image_size)
    onnx_preds, _ = ort_predict(out / "model.onnx", ds)
    # The station reads the bundle and preprocesses a frame exactly as the export evaluated it (the one
    # letterbox, runtime.inference.boxes.fit), with the same Geometry back to original pixels.
    from runtime.bundle.load import load_bundle
    from runtime.inference.preprocess import Preprocessor, read_image

    assert "runtime_validation" not in m["provenance"]["export"]  # refused bundles are never written at all
    pre = Preprocessor(load_bundle(out).manifest.input)
    for i in range(len(ds)):
        raw = read_image(ds.samples[i].path)
        image, target = ds[i]
        np.testing.assert_allclose(pre(raw), image.numpy(), atol=1e-6)
        assert pre.box_geometry(*raw.shape[:2]) == target["geometry"]
    # Served by the station's own path (load_model: backend, probe, postprocessor, box decision), the
    # exported graph gives the same boxes in original pixels as the export's ONNX evaluation.
    import time

    from runtime.config.station import from_dict
    from runtime.inference.model import load_model
    from runtime.serving.messages import VERDICTS
    from runtime.sources.cameras import Frame

    for views in (["original"], ["original", "hflip", "vflip"]):
        cfg = from_dict(
            {
                "station": "s",
                "cameras": [{"id": "c", "source": str(tmp_path)}],
                "model": {"bundle": str(out), "backend": "onnxruntime-cpu", "warmup_runs": 0},
                "tta": {"views": views},
            },
            base=tmp_path,
        )
        served = load_model(cfg)
        for i, (ob, os_, ol) in enumerate(onnx_preds):
            raw = read_image(ds.samples[i].path)
            frame = Frame("c", i, raw, time.time(), time.monotonic())
            served.prepare(frame)
            (pred,) = served.post(served.backend.run(frame.tensor), 1, len(views), [frame.geometry])
            assert served.decider.decide(pred).verdict in VERDICTS
            b = pred.boxes
            assert np.all(b.boxes[:, 2] <= raw.shape[1]) and np.all(b.boxes[:, 3] <= raw.shape[0])
            if len(views) == 1:
                keep = os_ >= 0.05
                np.testing.assert_allclose(b.scores, os_[keep], atol=1e-6)
                np.testing.assert_allclose(b.boxes, ob[keep], atol=1e-3)
                assert b.labels.tolist() == (ol[keep] + 1).tolist()  # labels index ["ok", *classes]
        served.close()
    for (tb, ts, tl), (ob, os_, ol) in zip(predict(model, ds), onnx_preds):
        keep_t, keep_o = ts >= 0.05, os_ >= 0.05
        assert keep_t.sum() == keep_o.sum()
        np.testing.assert_allclose(np.sort(ts[keep_t]), np.sort(os_[keep_o]), atol=1e-3)
        assert sorted(tl[keep_t].tolist()) == sorted(ol[keep_o].tolist())
        if keep_t.any():  # boxes in original pixels agree (the ONNX side mapped back by ort_predict)
            a, b = tb[keep_t], ob[keep_o]
            # IoU for boxes with area; a box clipped to zero width at the image edge has IoU 0 even
            # with itself, so it must match some ONNX box coordinate by coordinate instead.
            coord_match = (np.abs(a[:, None, :] - b[None, :, :]).max(-1) <= 1e-2).any(1)
            assert np.all((box_iou(a, b).max(1) >= 0.98) | coord_match)


def test_export_refuses_existing_bundle(det_run, tmp_path):
    _, run = det_run
    (tmp_path / "b").mkdir()
    assert ds_main(["export", str(run), "--out", str(tmp_path / "b")]) == 1


def test_parity_failure_refuses_the_export(det_run, tmp_path):
    from calibration.detection_bundle import export_run
    from calibration.export_detection import DetectionExportError

    _, run = det_run
    out = tmp_path / "refused"
    # A negative score tolerance no real match can meet: the check must refuse and write nothing.
    with pytest.raises(DetectionExportError):
        export_run(run, out, parity_images=4, parity_score_tol=-1.0, echo=lambda *_: None)
    assert not out.exists()


def test_export_uint8_input_adds_a_parity_checked_detector_twin(det_run, tmp_path):
    """``export --uint8-input`` of a detector: ``fp32-u8`` takes letterboxed uint8 frames and gives the float
    artifact's boxes, scores and labels (checked at export, recorded, and again here on the station's loader)."""
    from runtime.bundle.load import load_bundle
    from runtime.inference.ort_session import ort_session
    from runtime.inference.preprocess import Preprocessor

    _, run = det_run
    out = tmp_path / "bundle"
    args = ["export", str(run), "--out", str(out), "--threads", "1", "--parity-images", "4", "--uint8-input"]
    assert ds_main(args) == 0
    b = load_bundle(out)
    assert b.artifact("fp32-u8").input == "uint8_nhwc"
    assert b.manifest.provenance["export"]["uint8_parity"]["fp32-u8"]["passed"] is True
    pre = Preprocessor(b.manifest.input)
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (50, 80, 3), dtype=np.uint8) for _ in range(2)]
    fs, us = ort_session(b.artifact_path("fp32"), 1), ort_session(b.artifact_path("fp32-u8"), 1)
    for f in frames:
        ref = fs.run(None, {"input": pre.batch([f])})
        got = us.run(None, {"input": pre.frame_uint8(f)[None]})
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r, atol=1e-3)


def test_station_serves_the_detector_uint8_twin_with_flip_views(det_run, tmp_path):
    """The station loads ``fp32-u8`` of a detector with TTA flips (views built in uint8, boxes unflipped) and
    judges a frame with the same boxes as the float artifact."""
    from runtime.config.station import load_config
    from runtime.inference.model import load_model
    from runtime.sources.cameras import Frame
    from tests.runtime._helpers import station_config

    _, run = det_run
    out = tmp_path / "bundle"
    args = ["export", str(run), "--out", str(out), "--threads", "1", "--parity-images", "2"]
    assert ds_main([*args, "--uint8-input"]) == 0
    (tmp_path / "r").mkdir()
    frame = np.random.default_rng(7).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    preds = {}
    for art in ("fp32", "fp32-u8"):
        (tmp_path / art).mkdir()
        cfg, _ = station_config(
            tmp_path / art,
            out,
            [{"id": "cam1", "source": str(tmp_path / "r")}],
            model={"artifact": art},
            tta={"views": ["original", "hflip"]},
        )
        model = load_model(load_config(cfg))
        try:
            f = Frame(camera="cam1", seq=0, image=frame, captured_at=0.0, t_capture=0.0)
            model.prepare(f)
            assert f.tensor.dtype == (np.uint8 if art == "fp32-u8" else np.float32)
            outputs = model.backend.run(model.stack([f]))
            preds[art] = model.post(outputs, 1, model.tta.n_views, [f.geometry])[0]
        finally:
            model.close()
    np.testing.assert_allclose(preds["fp32-u8"].scores, preds["fp32"].scores, atol=1e-3)
    a, b = preds["fp32"].boxes, preds["fp32-u8"].boxes
    assert len(a.scores) == len(b.scores)
    np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-2)


def test_export_options_are_honoured_or_refused_for_detectors(det_run, tmp_path, capsys):
    """--opset, --parity-images and --pack take effect; classifier-only options are refused by name."""
    import tarfile

    _, run = det_run
    out, archive = tmp_path / "b18", tmp_path / "b18.tar.gz"
    argv = ["export", str(run), "--out", str(out), "--threads", "2"]
    assert ds_main([*argv, "--opset", "18", "--parity-images", "3", "--pack", str(archive)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["provenance"]["export"]["opset"] == 18
    assert m["provenance"]["export"]["parity"]["images"] == 3
    with tarfile.open(archive) as t:
        assert any(n.endswith("manifest.json") for n in t.getnames())
    for flag in (["--no-eval"], ["--no-simplify"], ["--parity-atol", "0.1"]):
        capsys.readouterr()
        assert ds_main([*argv[:3], str(tmp_path / "x"), *flag]) != 0
        err = capsys.readouterr()
        assert f"{flag[0]}: not for a detector" in err.out + err.err
        assert not (tmp_path / "x").exists()
