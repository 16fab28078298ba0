"""The data planner's rules on synthetic fingerprints (training.plan), and --plan through the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from tests.training.detection.conftest import det_run  # noqa: F401, F811  (a tiny trained detector run)
from training.plan import (
    MIN_PER_CLASS,
    PlanError,
    classification_fingerprint,
    detection_fingerprint,
    plan_classification,
    plan_detection,
)


def samples(n: int, size: int, boxes_hw: list[tuple[float, float]], per_image: int = 1, seed: int = 0):
    """n images size x size, each with ``per_image`` boxes drawn from ``boxes_hw`` (pixels), label 0 (the first class)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bs = []
        for _ in range(per_image):
            h, w = boxes_hw[int(rng.integers(len(boxes_hw)))]
            x, y = float(rng.uniform(0, size - w)), float(rng.uniform(0, size - h))
            bs.append((x, y, x + w, y + h))
        out.append(SimpleNamespace(width=size, height=size, boxes=tuple(bs), labels=(0,) * per_image))
    return out


def test_thin_scratches_get_elongated_ratios_and_tighter_nms():
    fp = detection_fingerprint(samples(300, 320, [(4, 80), (3, 120), (5, 60)]), ["scratch"])
    plan = plan_detection(fp)
    ratios = plan.choices["aspect_ratios"]
    assert min(ratios) <= 0.1 and 1.0 in ratios  # h/w of ~0.04-0.08 boxes reached, square kept
    assert plan.choices["box_nms_thresh"] < 0.5 and plan.choices["fusion_iou"] < 0.55
    compact = plan_detection(detection_fingerprint(samples(300, 320, [(40, 40), (30, 45)]), ["pit"]))
    assert compact.choices["aspect_ratios"] == (0.5, 1.0, 2.0) and "box_nms_thresh" not in compact.choices
    assert "fusion_iou" not in compact.choices
    # Vertical and horizontal scratches alike: both directions covered.
    both = plan_detection(detection_fingerprint(samples(300, 320, [(4, 80), (80, 4)]), ["scratch"]))
    assert min(both.choices["aspect_ratios"]) <= 0.1 and max(both.choices["aspect_ratios"]) >= 10


def test_tiny_boxes_get_smaller_anchors_and_a_larger_input():
    big = plan_detection(detection_fingerprint(samples(300, 1024, [(200, 200), (150, 260)]), ["stain"]))
    tiny = plan_detection(detection_fingerprint(samples(300, 1024, [(12, 12), (10, 14)]), ["hole"]))
    assert tiny.choices["image_size"][0] > big.choices["image_size"][0]
    assert tiny.choices["anchor_sizes"][0] < big.choices["anchor_sizes"][0]
    assert len(tiny.choices["anchor_sizes"]) == 4  # one per FPN map of the project trunks
    # Larger inputs take smaller batches (pixels per step kept), never below 2.
    assert tiny.choices["batch_size"] <= big.choices["batch_size"] and tiny.choices["batch_size"] >= 2
    # Never above the images' own size (upsampling invents no detail), never below 320.
    small_imgs = plan_detection(detection_fingerprint(samples(300, 200, [(3, 3)]), ["hole"]))
    assert small_imgs.choices["image_size"] == (320, 320)


def test_coco_layout_keeps_three_ratios_and_five_sizes():
    fp = detection_fingerprint(samples(300, 320, [(4, 80), (3, 120)]), ["scratch"])
    plan = plan_detection(fp, levels=3, per_level=False, n_ratios=3)
    assert len(plan.choices["aspect_ratios"]) == 3 and len(plan.choices["anchor_sizes"]) == 5


def test_epochs_and_patience_follow_the_image_count_and_small_data_warns():
    few = plan_detection(detection_fingerprint(samples(17, 320, [(40, 40)]), ["pit"]))
    many = plan_detection(detection_fingerprint(samples(3000, 320, [(40, 40)]), ["pit"]))
    assert few.choices["epochs"] > many.choices["epochs"] and few.choices["patience"] >= 3
    assert any(f"fewer than {MIN_PER_CLASS} boxes" in w and "pit (17)" in w for w in few.warnings)
    assert not many.warnings
    with pytest.raises(PlanError, match="empty"):
        detection_fingerprint([], ["a"])
    with pytest.raises(PlanError, match="no boxes"):
        plan_detection(detection_fingerprint([SimpleNamespace(width=9, height=9, boxes=(), labels=())], ["a"]))


def test_classifier_plan_resolution_from_the_images():
    fp = classification_fingerprint([(300, 300)] * 400, ["a"] * 200 + ["b"] * 200)
    plan = plan_classification(fp)
    assert plan.choices["image_size"] == 288 and not plan.warnings
    small = plan_classification(classification_fingerprint([(200, 180)] * 60, ["a"] * 30 + ["b"] * 30))
    assert small.choices["image_size"] == 160 and small.choices["epochs"] >= plan.choices["epochs"]
    assert any("a (30)" in w for w in small.warnings)
    assert "image_size" in "\n".join(plan.lines())


def test_plan_only_and_plan_auto_keep_the_users_flags(tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from defectscope.cli import main as ds_main
    from tests.training.detection.conftest import TINY, write_squares_coco

    root = write_squares_coco(tmp_path / "coco", ("square", "bar"))
    data = ["--data", str(root / "train.json")]
    assert ds_main(["train", *data, "--out", str(tmp_path / "p"), "--plan-only", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "plan from 10 training images" in out and "epochs = 3" not in out and "(yours kept)" in out
    assert "too small to learn from" in out
    assert not (tmp_path / "p").exists()
    run = tmp_path / "run"
    argv = ["train", *data, "--out", str(run), *TINY, "--epochs", "1", "--max-steps-per-epoch", "1", "--plan", "auto"]
    assert ds_main(argv) == 0
    card = json.loads((run / "model.json").read_text())
    plan = card["plan"]
    assert "epochs" not in plan["applied"] and "image_size" not in plan["applied"]  # the user's flags win
    assert "rpn_post_nms_test" in plan["applied"] and "patience" in plan["applied"]
    assert card["detector"]["image_size"] == [64, 64]
    assert card["detector"]["rpn_post_nms_test"] == plan["choices"]["rpn_post_nms_test"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["patience"] == plan["choices"]["patience"] and cfg["plan"] == "auto"
    assert json.loads((run / "report.json").read_text())["plan"]["applied"] == plan["applied"]


def test_small_data_warns_with_the_plan_off(tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from defectscope.cli import main as ds_main
    from tests.training.detection.conftest import TINY, write_squares_coco

    root = write_squares_coco(tmp_path / "coco", ("square",))
    argv = ["train", "--data", str(root / "train.json"), "--out", str(tmp_path / "r"), *TINY, "--epochs", "1"]
    assert ds_main([*argv, "--max-steps-per-epoch", "1", "--panels", "0"]) == 0
    assert "warning: too small to learn from: square" in capsys.readouterr().out


def test_classifier_plan_auto_fills_only_unset_image_size(folder_data, tmp_path, capsys):
    from training.classification.cli import train_main

    run = tmp_path / "cls"
    argv = ["--data", str(folder_data), "--backbone", "tiny_cnn", "--weights", "none", "--epochs", "1"]
    argv += ["--head-epochs", "0", "--batch-size", "16", "--threads", "1", "--out", str(run), "--quiet"]
    assert train_main([*argv, "--plan", "auto", "--max-steps-per-epoch", "1"]) == 0
    out = capsys.readouterr().out
    assert "warning: too small to learn from" in out and "epochs = " in out and "(yours kept)" in out
    plan = json.loads((run / "plan.json").read_text())
    assert plan["applied"] == ["image_size"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["image_size"] == plan["choices"]["image_size"] == 160 and cfg["epochs"] == 1


def test_extend_warns_on_small_new_data(det_run, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("pycocotools")
    from defectscope.cli import main as ds_main
    from tests.training.detection.conftest import write_squares_coco

    _, src = det_run
    new = write_squares_coco(tmp_path / "line2", ("square", "pit"), seed=3)
    argv = ["extend", "--from", str(src), "--data", str(new / "train.json"), "--out", str(tmp_path / "ext")]
    argv += ["--epochs", "1", "--max-steps-per-epoch", "1", "--fisher-samples", "2", "--threads", "2", "--quiet"]
    assert ds_main([*argv, "--panels", "0"]) == 0
    out = capsys.readouterr().out
    assert "warning: too small to learn from" in out and "pit (" in out
    assert "bar (" not in out  # an old class absent from the new data comes from the source run
