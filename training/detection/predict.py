"""Run a detector over a :class:`DetectionDataset`: boxes back in original pixels, optional flip TTA.

The geometry and the TTA merge are the station's (``runtime.inference.boxes``): boxes go back with
``Geometry.to_original``, flipped views with ``unflip_boxes`` and are merged by
``weighted_box_fusion``, so offline evaluation measures what a station would report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from runtime.inference.boxes import FUSION_IOU, unflip_boxes, weighted_box_fusion
from training.detection.loader import DetectionDataset

TTA_VIEWS = ("original", "hflip", "vflip", "rot180")


def _view(x: torch.Tensor, view: str) -> torch.Tensor:
    dims = {"original": [], "hflip": [-1], "vflip": [-2], "rot180": [-2, -1]}[view]
    return x.flip(dims) if dims else x


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: DetectionDataset,
    views: Sequence[str] = ("original",),
    batch_size: int = 4,
    iou_thr: float | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (boxes (N,4) original pixels, scores (N,), labels (N,) 0-based class indices). Views are fused
    at ``iou_thr`` (None: the detector spec's ``fusion_iou``, which the bundle gives stations)."""
    spec = getattr(model, "detector_spec", None)
    fuse_iou = iou_thr if iou_thr is not None else (spec.fusion_iou if spec is not None else FUSION_IOU)
    bad = [v for v in views if v not in TTA_VIEWS]
    if bad or not views:
        raise ValueError(f"tta views: expected some of {TTA_VIEWS}, got {list(views)}")
    model.eval()
    out = []
    h, w = dataset.size
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = [_view(img, v) for img, _ in items for v in views]  # views of a frame adjacent, one call
        dets = model(images)
        for j, (_, target) in enumerate(items):
            per_view = []
            for k, v in enumerate(views):
                d = dets[j * len(views) + k]
                per_view.append(
                    (unflip_boxes(d["boxes"].numpy(), w, h, v), d["scores"].numpy(), d["labels"].numpy() - 1)
                )
            boxes, scores, labels = per_view[0] if len(views) == 1 else weighted_box_fusion(per_view, fuse_iou)
            out.append(
                (target["geometry"].to_original(boxes), np.asarray(scores, np.float32), np.asarray(labels, np.int64))
            )
    return out


__all__ = ["TTA_VIEWS", "predict"]
