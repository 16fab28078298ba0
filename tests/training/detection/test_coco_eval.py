"""COCO metrics via pycocotools against hand-computed values, and the part-level verdict metrics."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from runtime.inference.boxes import BoxPolicy  # noqa: E402
from training.detection.coco_eval import coco_metrics, operating_point, part_metrics  # noqa: E402
from training.detection.formats import DetSample  # noqa: E402

CLASSES = ["crack", "spot"]


def _s(boxes, labels) -> DetSample:
    return DetSample("x.png", 200, 200, tuple(tuple(map(float, b)) for b in boxes), tuple(labels))


def test_map_hand_checked():
    gts = [_s([[10, 10, 50, 50], [100, 100, 200, 200]], [0, 1]), _s([[20, 20, 60, 60]], [0])]
    preds = [
        ([[10, 10, 50, 50], [100, 100, 200, 172]], [0.9, 0.6], [0, 1]),  # spot box: IoU 72/100 = 0.72
        ([[120, 120, 160, 160], [20, 20, 60, 60]], [0.8, 0.7], [0, 0]),  # a false crack, then the true one
    ]
    m = coco_metrics(gts, preds, CLASSES)
    # crack, ranked TP 0.9, FP 0.8, TP 0.7: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1. COCO's 101-point
    # interpolation: recall 0..0.50 (51 points) -> 1, 0.51..1 (50 points) -> 2/3, at every IoU (exact boxes).
    crack_ap = (51 + 50 * 2 / 3) / 101
    # spot: IoU 0.72 is a hit at thresholds .50-.70 (5 of 10): AP 0.5, AP50 1.
    assert m["per_class"]["crack"]["ap"] == pytest.approx(crack_ap)
    assert m["per_class"]["crack"]["ap50"] == pytest.approx(crack_ap)
    assert m["per_class"]["spot"]["ap"] == pytest.approx(0.5)
    assert m["per_class"]["spot"]["ap50"] == pytest.approx(1.0)
    assert m["map"] == pytest.approx((crack_ap + 0.5) / 2)
    assert m["map50"] == pytest.approx((crack_ap + 1.0) / 2)
    assert m["per_class"]["spot"]["recall50"] == 1.0 and m["per_class"]["spot"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["crack"]["recall"] == 1.0 and m["per_class"]["crack"]["boxes"] == 2


def test_no_predictions_and_negatives():
    gts = [_s([[10, 10, 50, 50]], [0]), _s([], [])]
    m = coco_metrics(gts, [(np.zeros((0, 4)), [], []), (np.zeros((0, 4)), [], [])], CLASSES)
    assert m["map"] == 0.0 and m["per_class"]["crack"]["recall50"] == 0.0
    assert m["per_class"]["spot"]["ap"] is None  # no spot in the truth: undefined, not 0
    assert coco_metrics([_s([], [])], [(np.zeros((0, 4)), [], [])], CLASSES)["map"] is None
    with pytest.raises(ValueError, match="2 images but 1"):
        coco_metrics(gts, gts[:1], CLASSES)


def test_part_level_hand_checked():
    box = [[10, 10, 50, 50]]
    gts = [_s(box, [0]), _s(box, [1]), _s([], []), _s([], []), _s(box, [0])]
    preds = [
        (box, [0.9], [0]),  # defective, found
        (box, [0.55], [1]),  # defective, score in the uncertain band (0.5 +- 0.1)
        (box, [0.95], [0]),  # clean, false alarm
        (np.zeros((0, 4)), [], []),  # clean, ok
        (box, [0.3], [0]),
    ]  # defective, missed
    policy = BoxPolicy(default_threshold=0.5, band=0.1)
    m = part_metrics(gts, preds, CLASSES, policy)
    assert m["confusion"] == {"tp": 2, "fn": 1, "fp": 1, "tn": 1} and m["uncertain"] == 1
    assert m["accuracy"] == pytest.approx(3 / 5) and m["recall"] == pytest.approx(2 / 3)
    assert m["false_alarm_rate"] == pytest.approx(1 / 2)
    strict = part_metrics(gts, preds, CLASSES, policy, uncertain_as="ok")
    assert strict["recall"] == pytest.approx(1 / 3)
    # A per-class threshold and a minimum area change the verdicts the station would make.
    tuned = part_metrics(gts, preds, CLASSES, BoxPolicy(thresholds={"crack": 0.97, "spot": 0.5}))
    assert tuned["confusion"] == {"tp": 1, "fn": 2, "fp": 0, "tn": 2}
    assert part_metrics(gts, preds, CLASSES, BoxPolicy(min_area=2000))["confusion"]["tp"] == 0


def test_operating_point_hand_checked():
    box = [[10, 10, 50, 50]]
    none = (np.zeros((0, 4)), [], [])
    # Clean images' best scores: 0.9, 0.6, 0.2, no box; the defective image does not count.
    gts = [_s([], []), _s([], []), _s([], []), _s([], []), _s(box, [0])]
    preds = [(box * 2, [0.3, 0.9], [0, 1]), (box, [0.6], [0]), (box, [0.2], [1]), none, (box, [0.99], [0])]
    t0 = operating_point(gts, preds, 0.0)  # no clean image may be flagged: just above 0.9
    assert 0.9 < t0 < 0.9 + 1e-6
    t25 = operating_point(gts, preds, 0.25)  # one of four may: just above 0.6
    assert 0.6 < t25 < 0.6 + 1e-6
    assert part_metrics(gts, preds, CLASSES, BoxPolicy(default_threshold=t25))["confusion"] == {
        "tp": 1,
        "fn": 0,
        "fp": 1,
        "tn": 3,
    }
    assert operating_point(gts, preds, 0.2) == t0  # 0.2 x 4 = 0.8 images: none may be flagged
    assert operating_point(gts[4:], preds[4:], 0.02) is None  # no clean image to choose on
    with pytest.raises(ValueError, match="max_false_alarm"):
        operating_point(gts, preds, 1.5)
