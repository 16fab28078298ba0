"""The detection task part of the one training engine (``training.engine.Engine``).

``DetectionTask.step``: a batch ``(list of (3,H,W) images, list of targets)`` goes through
torchvision's ``FasterRCNN`` in train mode; the task loss is the sum of its loss dict
(``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``), each
reported as a named part. ``evaluate``: COCO mAP (pycocotools) plus the station's
part-level verdict (``runtime.inference.boxes.BoxPolicy``). The monitor is val mAP@.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runtime.inference.boxes import BoxPolicy
from training.detection.coco_eval import coco_metrics, part_metrics
from training.detection.formats import DetSample
from training.engine import Engine, StepResult

MONITOR = "map50"


@dataclass
class DetPredictions:
    """Ground truth and per-image ``(boxes (N,4) original px, scores, labels 0-based)`` in the same order."""

    samples: Sequence[DetSample]
    predictions: Sequence[tuple[Any, Any, Any]]


def move_targets(targets: Sequence[dict[str, Any]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Only what the detector reads; ``BoundingBoxes`` become plain tensors (float32 xyxy)."""
    return [
        {
            "boxes": torch.as_tensor(t["boxes"]).as_subclass(torch.Tensor).float().reshape(-1, 4).to(device),
            "labels": torch.as_tensor(t["labels"]).long().to(device),
        }
        for t in targets
    ]


@dataclass
class DetectionTask:
    score_threshold: float = 0.5  # part-level verdict: a part is defective when a box scores >= this

    def step(self, model: nn.Module, batch: Any, engine: Engine) -> StepResult:
        images, targets = batch
        images = [im.to(engine.device, non_blocking=True).float() for im in images]
        losses = model(images, move_targets(targets, engine.device))
        if not isinstance(losses, dict) or not losses:
            raise TypeError("a detector in train mode must return its loss dict (torchvision FasterRCNN)")
        loss = sum(v.float() for v in losses.values())
        return StepResult(loss, len(images), 0, {k: float(v.detach()) for k, v in losses.items()})

    def policy(self) -> BoxPolicy:
        return BoxPolicy(default_threshold=self.score_threshold)

    def evaluate(self, preds: DetPredictions, classes: Sequence[str]) -> dict[str, Any]:
        m = coco_metrics(preds.samples, preds.predictions, classes)
        m["part"] = part_metrics(preds.samples, preds.predictions, classes, self.policy())
        return m


def monitor_value(metrics: dict[str, Any]) -> float:
    """val mAP@.5; no ground-truth boxes at all (None) scores 0."""
    v = metrics.get(MONITOR)
    return float(v) if v is not None else 0.0


__all__ = ["MONITOR", "DetPredictions", "DetectionTask", "monitor_value", "move_targets"]
