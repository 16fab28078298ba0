"""Copy-paste augmentation (a lever, off by default until measured): defect crops cut from other
training images (their boxes, in letterboxed model-input pixels) pasted onto an image at random
free places, each with its box and label. Clean images gain defects; images with defects gain more.

Pasting happens on the letterboxed uint8 image, before the dataset's own transform (flips, zoom,
jitter), so the pasted boxes are augmented with the rest. No place that overlaps a box already
there is used (a few tries, then that crop is skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors

from training.detection.formats import DetSample
from training.detection.loader import DetectionDataset

TRIES = 5  # random places tried per crop before it is skipped


class CopyPasteDataset(DetectionDataset):
    """A training ``DetectionDataset`` that, with probability ``p`` per item, pastes 1..``max_paste`` crops."""

    def __init__(
        self,
        samples: Sequence[DetSample],
        size: tuple[int, int],
        transform: Callable | None,
        p: float,
        max_paste: int = 2,
    ) -> None:
        super().__init__(samples, size, transform)
        self.p, self.max_paste = float(p), int(max_paste)
        self.donors = [i for i, s in enumerate(self.samples) if s.boxes]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.load(i)
        if self.donors and float(torch.rand(())) < self.p:
            n = int(torch.randint(1, self.max_paste + 1, ()))
            for _ in range(n):
                image, target = self.paste(image, target, self.donors[int(torch.randint(len(self.donors), ()))])
        return self.transform(image, target)

    def paste(self, image: Any, target: dict[str, Any], donor: int) -> tuple[Any, dict[str, Any]]:
        """One crop of ``donor`` pasted onto ``image`` (uint8 (3,H,W)) at a free place; the box and label added."""
        d_img, d_tgt = self.load(donor)
        boxes = d_tgt["boxes"].as_subclass(torch.Tensor)
        k = int(torch.randint(len(boxes), ()))
        x0, y0, x1, y1 = (int(round(float(v))) for v in boxes[k])
        h, w = y1 - y0, x1 - x0
        H, W = image.shape[-2:]
        if h < 2 or w < 2 or h >= H or w >= W:
            return image, target
        have = target["boxes"].as_subclass(torch.Tensor)
        for _ in range(TRIES):
            x, y = int(torch.randint(0, W - w + 1, ())), int(torch.randint(0, H - h + 1, ()))
            new = torch.tensor([[x, y, x + w, y + h]], dtype=have.dtype)
            if len(have):
                ix = (torch.minimum(have[:, 2], new[0, 2]) - torch.maximum(have[:, 0], new[0, 0])).clamp(min=0)
                iy = (torch.minimum(have[:, 3], new[0, 3]) - torch.maximum(have[:, 1], new[0, 1])).clamp(min=0)
                if bool((ix * iy > 0).any()):
                    continue
            out = image.as_subclass(torch.Tensor).clone()
            out[:, y : y + h, x : x + w] = d_img.as_subclass(torch.Tensor)[:, y0:y1, x0:x1]
            target = dict(target)
            target["boxes"] = tv_tensors.wrap(torch.cat([have, new]), like=target["boxes"])
            target["labels"] = torch.cat([target["labels"], d_tgt["labels"][k : k + 1]])
            return tv_tensors.Image(out), target
        return image, target


__all__ = ["CopyPasteDataset"]
