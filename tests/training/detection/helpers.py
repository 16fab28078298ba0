"""A tiny trained detector on bright squares (shared by the detection, export and evaluation tests)."""

from __future__ import annotations

import functools

import numpy as np

from tests.training.detection.conftest import squares_image

SIZE = 64


def squares_batch(rng: np.random.Generator, n: int, size: int = SIZE):
    """n RGB float images (3,S,S) in [0,1] with 1-2 squares (label 1) or bars 2x wider (label 2)."""
    import torch

    images, targets = [], []
    for _ in range(n):
        img, boxes = squares_image(rng, (size, size), int(rng.integers(1, 3)), side=(10, 16))
        labels = []
        for b in boxes:
            if rng.random() < 0.5:  # a bar: widen to 2x, dim it (class 2)
                b[2] = min(size, b[0] + 2 * (b[2] - b[0]))
                img[b[1] : b[3], b[0] : b[2]] = 150
                labels.append(2)
            else:
                img[b[1] : b[3], b[0] : b[2]] = 220
                labels.append(1)
        images.append(torch.from_numpy(np.repeat(img[None], 3, 0).astype(np.float32) / 255.0))
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
            }
        )
    return images, targets


@functools.lru_cache(maxsize=4)
def train_tiny_detector(steps: int = 60, seed: int = 0):
    """tiny_det at 64 px, Adam on fresh squares each step; ~10 s on one core, trained once per process
    (callers only evaluate it)."""
    import torch

    from training.detection.model import DetectorSpec, build_detector

    torch.manual_seed(seed)
    spec = DetectorSpec(
        classes=("square", "bar"),
        backbone="tiny_det",
        weights="none",
        image_size=(SIZE, SIZE),
        fpn_channels=16,
        representation_size=64,
        anchor_sizes=(12, 24, 48, 96),
        aspect_ratios=(0.5, 1.0, 2.0),
        frozen_bn=False,
        rpn_pre_nms_train=300,
        rpn_post_nms_train=100,
        box_batch_size_per_image=64,
        rpn_batch_size_per_image=64,
        rpn_pre_nms_test=50,
        rpn_post_nms_test=50,
        detections_per_img=20,
    )
    model = build_detector(spec)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        images, targets = squares_batch(rng, 4)
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
