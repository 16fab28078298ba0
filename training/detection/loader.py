"""``DetSample`` list -> torch Dataset of (image, target) in torchvision's detection format.

Each item: the file read by ``runtime.inference.preprocess.read_image``, letterboxed to the input
size by ``runtime.inference.boxes.fit`` (the station's own geometry), gray replicated to RGB, then the
v2 transform. ``target``: ``boxes`` (``tv_tensors.BoundingBoxes`` XYXY in model-input
pixels), ``labels`` (int64, 1-based: 0 is torchvision's background), ``image_id`` (index),
``orig_size`` (H, W) and ``geometry`` (``runtime.inference.boxes.Geometry`` of the letterbox, to map
predictions back; it does not describe the random augmentation, so use it with ``eval_transform``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from runtime.inference.boxes import fit
from runtime.inference.preprocess import read_image
from training.detection.formats import DetSample
from training.detection.transforms import eval_transform


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 gray (H,W) or BGR (H,W,3) -> RGB (H,W,3)."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class DetectionDataset(Dataset):
    def __init__(
        self,
        samples: Sequence[DetSample],
        size: tuple[int, int],
        transform: Callable | None = None,
        policy: str = "letterbox",
        interpolation: str = "bilinear",
        pad_value: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.size = (int(size[0]), int(size[1]))
        self.transform = transform if transform is not None else eval_transform()
        self.policy, self.interpolation, self.pad_value = policy, interpolation, pad_value

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """Item ``i`` letterboxed, before the transform (uint8)."""
        s = self.samples[i]
        raw = read_image(s.path)
        img, geo = fit(raw, *self.size, policy=self.policy, interpolation=self.interpolation, pad_value=self.pad_value)
        boxes = geo.to_model(s.boxes_array())
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=self.size),
            "labels": torch.from_numpy(s.labels_array() + 1),
            "image_id": i,
            "orig_size": (int(raw.shape[0]), int(raw.shape[1])),
            "geometry": geo,
        }
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(to_rgb(img).transpose(2, 0, 1))))
        return image, target

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.load(i)
        return self.transform(image, target)


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """torchvision detection models take lists (images may differ in size)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


__all__ = ["DetectionDataset", "collate", "to_rgb"]
