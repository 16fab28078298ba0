"""Detector training end to end through `defectscope train`, then `defectscope evaluate` on the run."""

from __future__ import annotations

import json

import pytest

from defectscope.cli import main as ds_main
from tests.training.detection.conftest import TINY

pytest.importorskip("pycocotools")


def test_train_writes_the_run_directory(det_run):
    _, out = det_run
    for f in (
        "config.json",
        "metrics.json",
        "best.safetensors",
        "model.json",
        "report.json",
        "curves.png",
        "pr_curves.png",
        "panels.png",
    ):
        assert (out / f).is_file(), f
    card = json.loads((out / "model.json").read_text())
    assert card["task"] == "detection" and card["classes"] == ["square", "bar"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "detection" and cfg["model"]["backbone"] == "tiny_det"
    hist = json.loads((out / "metrics.json").read_text())
    assert len(hist) == 2 and set(hist[0]["loss_parts"]) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    assert abs(hist[0]["train_loss"] - sum(hist[0]["loss_parts"].values())) < 1e-3
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "test" and "map50" in report and "false_alarm_rate" in report["part"]
    assert report["data"]["bad_annotations"]["skipped"] == 1


def test_strict_makes_bad_annotations_fatal(det_run, tmp_path, capsys):
    root, _ = det_run
    rc = ds_main(
        ["train", "--data", str(root / "train.json"), "--strict", "--out", str(tmp_path / "r"), "--epochs", "1", *TINY]
    )
    assert rc == 2
    assert "999" in capsys.readouterr().err


def test_existing_run_is_refused(det_run, capsys):
    root, out = det_run
    assert ds_main(["train", "--data", str(root / "train.json"), "--out", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_evaluate_detector_with_flip_tta(det_run, capsys):
    _, out = det_run
    rc = ds_main(["evaluate", str(out), "--tta", "flips", "--threads", "2"])
    assert rc == 0
    r = json.loads((out / "eval_test_flips.json").read_text())
    assert r["tta"]["views"] == ["original", "hflip", "vflip", "rot180"]
    assert set(r["tta_delta"]) >= {"map", "map50", "part_recall", "part_false_alarm_rate"}
    for c in ("square", "bar"):
        assert {"ap", "ap50", "recall", "recall50"} <= set(r["plain"]["per_class"][c])
    assert "mAP@.5" in capsys.readouterr().out


def test_evaluate_detector_operating_point(det_run, capsys):
    _, out = det_run
    rc = ds_main(["evaluate", str(out), "--max-false-alarm", "0.02", "--threads", "2", "--out", str(out / "op.json")])
    assert rc == 0
    op = json.loads((out / "op.json").read_text())["operating_point"]
    assert op["chosen_on"] == "val" and op["judged_on"] == "test" and op["max_false_alarm"] == 0.02
    plain = op["plain"]  # each split of the tiny set holds one clean image
    assert 0.0 <= plain["threshold"] <= 1.0
    assert plain["val"]["false_alarm_rate"] == 0.0 and plain["val"]["clean"] == 1
    assert set(plain["test"]) >= {"recall", "false_alarm_rate", "confusion"}
    assert ds_main(["evaluate", str(out), "--max-false-alarm", "2"]) == 2
    assert "--max-false-alarm: expected a rate in [0, 1)" in capsys.readouterr().err


def test_task_forced_and_help_reads_defaults(capsys):
    from training.detection.model import DetectorSpec

    with pytest.raises(SystemExit):
        ds_main(["train", "--task", "detection", "--help"])
    text = capsys.readouterr().out
    assert "--rpn-post-nms-test" in text and f"({DetectorSpec.__dataclass_fields__['fpn_channels'].default})" in text
