"""Detector evaluation: COCO box metrics via pycocotools and the part-level verdict a station makes.

``predictions`` are per image ``(boxes (N,4) xyxy in original pixels, scores (N,), labels (N,))``
with labels indexing ``classes`` (0-based, no background: subtract torchvision's 1 first).
Ground truth is the images' :class:`DetSample` list in the same order.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime.inference.boxes import BoxPolicy, as_boxes
from training.detection.formats import DetSample

Prediction = tuple[Any, Any, Any]


def _gt(samples: Sequence[DetSample], classes: Sequence[str]) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i, s in enumerate(samples, 1):
        images.append({"id": i, "width": s.width, "height": s.height, "file_name": s.path})
        for (x0, y0, x1, y1), lab in zip(s.boxes, s.labels):
            # ids from 1: pycocotools reads a matched id 0 as "unmatched".
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(lab) + 1,
                    "iscrowd": 0,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                }
            )
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
    }


def _dt(predictions: Sequence[Prediction], gt: dict[str, Any]) -> dict[str, Any]:
    anns: list[dict[str, Any]] = []
    for i, (boxes, scores, labels) in enumerate(predictions, 1):
        b = as_boxes(boxes)
        for (x0, y0, x1, y1), s, lab in zip(
            b.tolist(), np.asarray(scores).reshape(-1).tolist(), np.asarray(labels).reshape(-1).tolist()
        ):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(lab) + 1,
                    "score": float(s),
                    "iscrowd": 0,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                }
            )
    return {"images": gt["images"], "categories": gt["categories"], "annotations": anns}


def _coco(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def _mean_valid(a: np.ndarray) -> float | None:
    v = a[a > -1]
    return float(v.mean()) if v.size else None


def _evaluated(samples: Sequence[DetSample], predictions: Sequence[Prediction], classes: Sequence[str]) -> Any:
    """A summarized pycocotools ``COCOeval`` (bbox) of ``predictions`` against ``samples``."""
    from pycocotools.cocoeval import COCOeval

    if len(samples) != len(predictions):
        raise ValueError(f"coco_metrics: {len(samples)} images but {len(predictions)} predictions")
    gt = _gt(samples, classes)
    cg, cd = _coco(gt), _coco(_dt(predictions, gt))
    ev = COCOeval(cg, cd, "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def pr_curves(
    samples: Sequence[DetSample], predictions: Sequence[Prediction], classes: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class ``(recall (101,), precision (101,))`` at IoU .5, all areas, 100 detections (pycocotools'
    interpolated curve; precision -1 where undefined is dropped)."""
    ev = _evaluated(samples, predictions, classes)
    rec = np.asarray(ev.params.recThrs)
    out = {}
    for k, name in enumerate(classes):
        p = ev.eval["precision"][0, :, k, 0, -1]
        ok = p > -1
        out[name] = (rec[ok], p[ok])
    return out


def coco_metrics(
    samples: Sequence[DetSample], predictions: Sequence[Prediction], classes: Sequence[str]
) -> dict[str, Any]:
    """mAP@[.5:.95], mAP@.5, per-class AP / AP50 / recall (IoU .5 and mean over .5:.95), all areas, 100 dets.

    Undefined values (a class, or the whole set, without ground-truth boxes) are None, not 0.
    """
    ev = _evaluated(samples, predictions, classes)
    prec = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]
    rec = ev.eval["recall"]  # [T, K, A, M]
    per_class = {}
    for k, name in enumerate(classes):
        per_class[name] = {
            "ap": _mean_valid(prec[:, :, k, 0, -1]),
            "ap50": _mean_valid(prec[0, :, k, 0, -1]),
            "recall50": _mean_valid(rec[0, k, 0, -1]),
            "recall": _mean_valid(rec[:, k, 0, -1]),
            "boxes": int(sum(lab == k for s in samples for lab in s.labels)),
        }
    stats = [float(v) if v > -1 else None for v in ev.stats]  # -1: no ground truth at all
    return {
        "map": stats[0],
        "map50": stats[1],
        "map75": stats[2],
        "mar100": stats[8],
        "per_class": per_class,
        "images": len(samples),
    }


def part_metrics(
    samples: Sequence[DetSample],
    predictions: Sequence[Prediction],
    classes: Sequence[str],
    policy: BoxPolicy,
    uncertain_as: str = "defect",
) -> dict[str, Any]:
    """The station's verdict per image (``runtime.inference.boxes.BoxPolicy``) against "has any true box".

    ``uncertain_as``: how an ``uncertain`` verdict counts ("defect": sent to review, the
    conservative reading; "ok"). Returns accuracy, recall of defective parts, false-alarm
    rate on clean parts, and the counts behind them.
    """
    if uncertain_as not in ("defect", "ok"):
        raise ValueError(f"uncertain_as: expected 'defect' or 'ok', got {uncertain_as!r}")
    policy.check_classes(classes)
    tp = fn = fp = tn = unc = 0
    for s, (boxes, scores, labels) in zip(samples, predictions, strict=True):
        v = policy.decide(boxes, scores, labels, classes).verdict
        unc += v == "uncertain"
        flagged = v == "defect" or (v == "uncertain" and uncertain_as == "defect")
        if s.negative:
            fp, tn = fp + flagged, tn + (not flagged)
        else:
            tp, fn = tp + flagged, fn + (not flagged)
    n = tp + fn + fp + tn
    return {
        "accuracy": (tp + tn) / n if n else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "false_alarm_rate": fp / (fp + tn) if fp + tn else None,
        "defective": tp + fn,
        "clean": fp + tn,
        "uncertain": unc,
        "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
    }


def operating_point(
    samples: Sequence[DetSample], predictions: Sequence[Prediction], max_false_alarm: float
) -> float | None:
    """The lowest single box-score threshold at which at most ``max_false_alarm`` of the clean images
    (no true box) would be flagged: a part is flagged when its best box scores >= the threshold.

    Choose it on a split other than the one it is judged on (val for test). None without clean images.
    """
    if not 0.0 <= max_false_alarm < 1.0:
        raise ValueError(f"max_false_alarm: expected a rate in [0, 1), got {max_false_alarm!r}")
    clean = sorted(
        (float(np.max(p[1])) if len(p[1]) else 0.0 for s, p in zip(samples, predictions, strict=True) if s.negative),
        reverse=True,
    )
    if not clean:
        return None
    allowed = int(np.floor(max_false_alarm * len(clean) + 1e-9))  # clean images that may be flagged
    if allowed >= len(clean):
        return 0.0
    # Just above the best score among the clean images that must stay unflagged.
    return float(min(1.0, np.nextafter(np.float32(clean[allowed]), np.float32(np.inf))))


__all__ = ["coco_metrics", "operating_point", "part_metrics", "pr_curves"]
