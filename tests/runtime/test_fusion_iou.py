"""A detection bundle's output.fusion_iou: written by export from the detector spec (the planner lowers it for
elongated defects), used by the station's flip-TTA box fusion, validated as untrusted input."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("pycocotools")

from tests.training.detection.conftest import det_run  # noqa: E402, F401  (a tiny trained detector run)


def test_fusion_iou_travels_from_the_run_to_the_station(det_run, tmp_path):  # noqa: F811
    from defectscope.cli import main as ds_main
    from runtime.bundle.fs import BundleError
    from runtime.bundle.manifest import Manifest
    from runtime.inference.boxes import FUSION_IOU
    from runtime.inference.decision import make_postprocessor

    _, run = det_run
    bundle = tmp_path / "bundle"
    assert ds_main(["export", str(run), "--out", str(bundle), "--threads", "2", "--parity-images", "2"]) == 0
    d = json.loads((bundle / "manifest.json").read_text())
    assert d["output"]["fusion_iou"] == FUSION_IOU  # the run's spec default
    views = ("original", "hflip")
    d["output"]["fusion_iou"] = 0.3
    assert make_postprocessor(Manifest.from_dict(d, where="m"), views).fusion_iou == 0.3
    del d["output"]["fusion_iou"]  # bundles exported before the key: the station's default
    assert make_postprocessor(Manifest.from_dict(d, where="m"), views).fusion_iou == FUSION_IOU
    for bad in (1.5, 0.0, "0.4", True, float("nan")):
        d["output"]["fusion_iou"] = bad
        with pytest.raises(BundleError, match="output.fusion_iou"):
            Manifest.from_dict(d, where="m")
