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


@pytest.mark.parametrize("scope", ["trunk", "all"])
def test_extend_ewc_scope_decides_what_is_anchored(det_run, tmp_path, scope):
    from training.detection.checkpoint import load_detector
    from training.detection.extend import EWC_SCOPES
    from training.ewc import EWCState

    _, src = det_run
    new = write_squares_coco(tmp_path / "line", ("square", "bar", "pit"), seed=7)
    out = tmp_path / "ext"
    argv = ["extend", "--from", str(src), "--data", str(new / "train.json"), "--out", str(out), "--epochs", "1"]
    argv += ["--max-steps-per-epoch", "1", "--fisher-samples", "2", "--threads", "2", "--quiet", "--panels", "0"]
    assert ds_main([*argv, "--ewc-scope", scope]) == 0
    covered = set(EWCState.load(out / "fisher_source.safetensors").fisher)
    model, _ = load_detector(src)
    expected = {n for n, _ in model.named_parameters() if n.startswith(EWC_SCOPES[scope])}
    assert covered == expected
    heads = {n for n in covered if n.startswith("roi_heads.")}
    # "all" anchors the box head and the old predictor rows (the predictor grew 3 -> 4 rows: new row free).
    assert (heads == set()) if scope == "trunk" else "roi_heads.box_predictor.cls_score.weight" in heads
    report = json.loads((out / "report.json").read_text())
    assert report["ewc_scope"] == scope and report["scenario"] == "new classes"


def test_extend_refuses_an_unknown_ewc_scope(det_run, tmp_path, capsys):
    from training.detection.config import DetTrainConfig
    from training.detection.extend import DetExtendConfig

    _, src = det_run
    with pytest.raises(SystemExit):
        ds_main(
            ["extend", "--from", str(src), "--data", "x.json", "--out", str(tmp_path / "o"), "--ewc-scope", "heads"]
        )
    assert "--ewc-scope" in capsys.readouterr().err
    train = DetTrainConfig.from_dict({"out": str(tmp_path / "o"), "data": {"path": "x.json"}}, where="test")
    with pytest.raises(ValueError, match="ewc_scope: expected one of"):
        DetExtendConfig(str(src), train, ewc_scope="heads")


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
    assert report["ewc_scope"] is None
