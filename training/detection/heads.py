"""The detector's parts shared by every architecture: the growable box predictor, frozen BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d


class DetectorConfigError(ValueError):
    """A detector setting out of range; the message names the key."""


class BoxPredictor(FastRCNNPredictor):
    """``FastRCNNPredictor`` that knows its class names (index 0 = background) and can grow."""

    def __init__(self, in_channels: int, classes: Sequence[str]) -> None:
        super().__init__(in_channels, len(classes) + 1)
        self.classes = list(classes)

    def grow_classes(self, new_names: Sequence[str]) -> list[int]:
        """Append classes; old rows of ``cls_score`` / ``bbox_pred`` are copied bit-exact. Returns the new labels."""
        new_names = [str(n) for n in new_names]
        clash = sorted(set(new_names) & set(self.classes)) or sorted({n for n in new_names if new_names.count(n) > 1})
        if clash or not new_names:
            raise DetectorConfigError(
                f"grow_classes: expected new distinct names, got {new_names} (existing: {self.classes})"
            )
        old_cls: nn.Linear = self.cls_score  # type: ignore[has-type]
        old_box: nn.Linear = self.bbox_pred  # type: ignore[has-type]
        k = old_cls.out_features + len(new_names)
        cls = nn.Linear(old_cls.in_features, k).to(old_cls.weight)
        box = nn.Linear(old_box.in_features, 4 * k).to(old_box.weight)
        with torch.no_grad():
            cls.weight[: old_cls.out_features] = old_cls.weight
            cls.bias[: old_cls.out_features] = old_cls.bias
            box.weight[: old_box.out_features] = old_box.weight
            box.bias[: old_box.out_features] = old_box.bias
        self.cls_score, self.bbox_pred = cls, box
        start = len(self.classes) + 1
        self.classes += new_names
        return list(range(start, start + len(new_names)))


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d with the same statistics."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
            n += 1
        else:
            n += freeze_batchnorm(child)
    return n


__all__ = ["BoxPredictor", "DetectorConfigError", "freeze_batchnorm"]
