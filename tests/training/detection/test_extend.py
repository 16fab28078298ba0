"""`defectscope extend` on a detector: new classes grow the box predictor (old rows bit-exact), EWC active."""

from __future__ import annotations

import json

import pytest
import torch

from defectscope.cli import main as ds_main
from tests.training.detection.conftest import write_squares_coco

pytest.importorskip("pycocotools")


def test_extend_new_classes_keeps_old_rows_and_applies_ewc(det_run, tmp_path):
    from training.detection.checkpoint import load_detector

    _, src = det_run
    new = write_squares_coco(tmp_path / "line2", ("square", "pit"), seed=3)
    out = tmp_path / "ext"
    rc = ds_main(
        [
            "extend",
            "--from",
            str(src),
            "--data",
            str(new / "train.json"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "0.05",
            "--fisher-samples",
            "3",
            "--lambda",
            "1e6",
            "--replay",
            "2",
            "--threads",
            "2",
            "--quiet",
            "--panels",
            "0",
        ]
    )
    assert rc == 0
    old, _ = load_detector(src)
    grown, card = load_detector(out)
    assert card.classes == ("square", "bar", "pit") and card.parent == str(src)
    po, pg = old.roi_heads.box_predictor, grown.roi_heads.box_predictor
    assert pg.cls_score.out_features == 4 and pg.bbox_pred.out_features == 16
    assert torch.equal(pg.cls_score.weight[:3], po.cls_score.weight)
    assert torch.equal(pg.cls_score.bias[:3], po.cls_score.bias)
    assert torch.equal(pg.bbox_pred.weight[:12], po.bbox_pred.weight)
    # the rest did train
    assert not torch.equal(grown.rpn.head.conv[0][0].weight, old.rpn.head.conv[0][0].weight)
    report = json.loads((out / "report.json").read_text())
    assert report["scenario"] == "new classes" and report["new_classes"] == ["pit"] and report["replay"] == 2
    assert report["ewc_penalty_last"] > 0  # the term is in the loss once the weights moved
    assert {"old", "new"} <= set(report["before"]) and "forgetting_map50" in report
    assert (out / "fisher_source.safetensors").is_file()


def test_extend_same_classes_new_line_without_ewc(det_run, tmp_path):
    _, src = det_run
    new = write_squares_coco(tmp_path / "line3", ("bar", "square"), seed=5)  # other order: mapped by name
    out = tmp_path / "ext2"
    rc = ds_main(
        [
            "extend",
            "--from",
            str(src),
            "--data",
            str(new / "train.json"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "1",
            "--lambda",
            "0",
            "--threads",
            "2",
            "--quiet",
            "--panels",
            "0",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scenario"] == "new line" and report["classes"] == ["square", "bar"]
    assert report["ewc_penalty_last"] is None and not (out / "fisher_source.safetensors").exists()
