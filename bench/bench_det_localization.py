#!/usr/bin/env python
"""How far box localization alone caps a detector's mAP@[.5:.95] (the issue-16 0.60 target).

COCO mAP@[.5:.95] averages AP over IoU thresholds 0.50..0.95; on thin boxes (a finger interruption
is ~8 px across) a 1 px error on each side already gives IoU ~0.73. This script measures, on a
detector run's held-out split:

* the per-side box error (px, original image) of every ground-truth box matched by a detection of
  its class at IoU >= 0.5 (plain and with flip TTA: WBF averages the views' boxes);
* the localization bound: the mAP@[.5:.95] a detector would reach if it found every box, with no
  false positives, and only the measured per-side errors (resampled per class onto every box) —
  and the same bound for Gaussian per-side errors of sigma px, on the split's own boxes.

Prints a table and writes JSON.

    python bench/bench_det_localization.py --run runs/bench-det/run --tta flips
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IOU_THRESHOLDS = tuple(0.5 + 0.05 * i for i in range(10))  # COCO's 0.50:0.05:0.95
MATCH_IOU = 0.5


def side_errors(samples: list[Any], predictions: list[Any], n_classes: int, min_score: float) -> dict[int, Any]:
    """Per class: (M,4) predicted - true xyxy (px) of GT boxes matched at IoU >= MATCH_IOU (best IoU)."""
    import numpy as np

    from runtime.inference.boxes import box_iou

    out: dict[int, list[Any]] = {k: [] for k in range(n_classes)}
    for s, (boxes, scores, labels) in zip(samples, predictions):
        gt, gl = s.boxes_array(), s.labels_array()
        keep = scores >= min_score
        boxes, labels = boxes[keep], labels[keep]
        for g, k in zip(gt, gl):
            cand = boxes[labels == k]
            if not len(cand):
                continue
            ious = box_iou(g[None], cand)[0]
            j = int(np.argmax(ious))
            if ious[j] >= MATCH_IOU:
                out[int(k)].append(cand[j] - g)
    return {k: np.asarray(v, np.float64).reshape(-1, 4) for k, v in out.items()}


def bound(gt_by_class: dict[int, Any], draw: Any, rounds: int = 100, seed: int = 0) -> dict[str, Any]:
    """mAP@[.5:.95] with every box found once, no false positives, errors from ``draw(rng, k, n) -> (n,4)``.

    With every detection a true match, AP at threshold t is the share of boxes with IoU >= t
    (a perfect ranking puts the wrong-IoU ones last, and COCO's interpolation keeps the head)."""
    import numpy as np

    from runtime.inference.boxes import box_iou

    rng = np.random.default_rng(seed)
    per_class = {}
    for k, g in gt_by_class.items():
        if not len(g):
            continue
        shares = []
        for _ in range(rounds):
            iou = np.diagonal(box_iou(g, g + draw(rng, k, len(g))))  # box i vs its own jittered copy
            shares.append([float((iou >= t).mean()) for t in IOU_THRESHOLDS])
        s = np.mean(shares, 0)
        per_class[k] = {"ap50": float(s[0]), "ap75": float(s[5]), "ap": float(s.mean())}
    return {"per_class": per_class, "map": float(np.mean([v["ap"] for v in per_class.values()]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="detector run directory")
    p.add_argument("--split", default="test")
    p.add_argument("--tta", default="flips", help="'none' or 'flips' (measured beside plain)")
    p.add_argument("--min-score", type=float, default=0.05, help="detections considered for a match")
    p.add_argument("--sigmas", default="0.5,1,1.5,2,3", help="Gaussian per-side errors (px) for the bound table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="result JSON (default <run>/bench_det_localization.json)")
    ns = p.parse_args(argv)
    import numpy as np
    import torch

    from calibration.detection_bundle import held_out_samples
    from runtime.fsio import atomic_write_json
    from training.detection.checkpoint import load_detector
    from training.detection.evaluate import tta_views
    from training.detection.loader import DetectionDataset
    from training.detection.predict import predict

    torch.set_num_threads(ns.threads)
    model, card = load_detector(ns.run)
    samples = held_out_samples(card, ns.split, None)
    ds = DetectionDataset(samples, card.detector.image_size)
    classes = list(card.classes)
    gt = {
        k: np.concatenate([s.boxes_array()[s.labels_array() == k] for s in samples]).reshape(-1, 4)
        for k in range(len(classes))
    }
    result: dict[str, Any] = {
        "run": ns.run,
        "split": ns.split,
        "images": len(samples),
        "classes": classes,
        "boxes": {classes[k]: len(v) for k, v in gt.items()},
        "measured": {},
    }
    settings = [("plain", ("original",))] + ([("tta", tta_views(ns.tta))] if ns.tta != "none" else [])
    with torch.no_grad():
        for name, views in settings:
            errs = side_errors(samples, predict(model, ds, views), len(classes), ns.min_score)

            def draw(rng: Any, k: int, n: int, errs: dict[int, Any] = errs) -> Any:
                e = errs[k]
                return e[rng.integers(0, len(e), n)] if len(e) else np.full((n, 4), 1e6)

            b = bound(gt, draw)
            result["measured"][name] = {
                "views": list(views),
                "per_class": {
                    classes[k]: {
                        "matched": len(e),
                        "recall50": len(e) / max(len(gt[k]), 1),
                        "side_error_sd_px": float(e.std()) if len(e) else None,
                        "side_error_mad_px": float(np.median(np.abs(e))) if len(e) else None,
                        "bound_ap": b["per_class"].get(k, {}).get("ap"),
                    }
                    for k, e in errs.items()
                },
                "bound_map": b["map"],
            }
    result["gaussian"] = {}
    for sigma in (float(x) for x in ns.sigmas.split(",")):
        b = bound(gt, lambda rng, k, n, s=sigma: rng.normal(0.0, s, (n, 4)))
        result["gaussian"][f"{sigma:g}"] = {
            "map": b["map"],
            "per_class": {classes[k]: v for k, v in b["per_class"].items()},
        }
    print(f"{ns.run} {ns.split}: {len(samples)} images, boxes {result['boxes']}")
    print(f"{'measured':8} {'class':20} {'matched@.5':>10} {'side err sd px':>15} {'|err| median':>13} {'bound AP':>9}")
    for name, m in result["measured"].items():
        for c, r in m["per_class"].items():
            sd, mad, ap = r["side_error_sd_px"], r["side_error_mad_px"], r["bound_ap"]
            print(
                f"{name:8} {c:20} {r['matched']:>10} {'n/a' if sd is None else f'{sd:.2f}':>15} "
                f"{'n/a' if mad is None else f'{mad:.2f}':>13} {'n/a' if ap is None else f'{ap:.3f}':>9}"
            )
        print(f"{name:8} localization bound on mAP@[.5:.95] (every box found, measured errors): {m['bound_map']:.3f}")
    print(
        "Gaussian per-side error sigma (px) -> bound mAP@[.5:.95]: "
        + ", ".join(f"{s}: {g['map']:.3f}" for s, g in result["gaussian"].items())
    )
    out = Path(ns.json) if ns.json else Path(ns.run) / "bench_det_localization.json"
    atomic_write_json(out, result)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
