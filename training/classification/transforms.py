"""torchvision.transforms.v2 pipelines: the validation reference transform and training augmentation.

Every pipeline is two stages so decoded images can be cached after the first:
``resize`` (uint8 ``(C,H,W)`` -> uint8, shorter side to ``resize_size``) and ``tail``
(crop / augment -> float32 ``(3,h,w)`` normalised). The resize stage is
``runtime.inference.preprocess.resize`` (the project's one resize, OpenCV), then ``CenterCrop((h, w))``
-> ``ToDtype(float32, scale=True)`` -> ``Normalize(mean, std)``: the validation pipeline
equals ``runtime.inference.preprocess.Preprocessor`` (docs/contracts.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from runtime.inference.preprocess import PLAIN, InputSpec
from training.classification.config import AugmentConfig

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "linear": InterpolationMode.BILINEAR,
    "linear_exact": InterpolationMode.BILINEAR,
    "bilinear_exact": InterpolationMode.BILINEAR,
}


class ToRGB(torch.nn.Module):
    """Replicate a 1-channel image to 3 channels (gray EL images into ImageNet backbones)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(3, *x.shape[-2:]) if x.shape[-3] == 1 else x


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees; non-square images only by 0 or 180."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = x.shape[-1] == x.shape[-2]
        k = int(torch.randint(4 if square else 2, ()).item())
        k = k if square else 2 * k
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


def to_chw_uint8(image: np.ndarray) -> torch.Tensor:
    """uint8 gray ``(H,W)`` -> ``(1,H,W)``; BGR ``(H,W,3)`` -> RGB ``(3,H,W)``."""
    if image.ndim == 2:
        return torch.from_numpy(np.ascontiguousarray(image))[None]
    return torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))


@dataclass(frozen=True)
class Pipeline:
    resize: Callable[[torch.Tensor], torch.Tensor]
    tail: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.resize(x))


class RuntimeResize(torch.nn.Module):
    """uint8 ``(C,H,W)`` -> uint8 ``(C,h,w)`` with ``runtime.inference.preprocess.resize``.

    Training, evaluation and the station resize with the same code (OpenCV), so the
    pixels a model is trained and measured on are the pixels it gets in production.
    """

    def __init__(self, spec: InputSpec, resize_size: int | None = None) -> None:
        super().__init__()
        self.stretch = spec.resize_policy == "stretch"
        self.size = (spec.height, spec.width) if self.stretch else (resize_size or spec.resize_size)
        self.interpolation = spec.interpolation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from runtime.inference.preprocess import resize, resized_size

        size = self.size
        h, w = size if isinstance(size, tuple) else resized_size(x.shape[-2], x.shape[-1], size)
        hwc = x.permute(1, 2, 0).numpy()  # (H,W,C) view, uint8
        out = resize(hwc if hwc.shape[2] > 1 else hwc[:, :, 0], h, w, self.interpolation)
        out = out[:, :, None] if out.ndim == 2 else out
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def resize_stage(spec: InputSpec, resize_size: int | None = None) -> torch.nn.Module:
    return RuntimeResize(spec, resize_size)


def batch_mix(aug: AugmentConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple] | None:
    """MixUp / CutMix over a batch (labels become class probabilities), or None when both are off."""
    ops = [
        *([v2.MixUp(alpha=float(aug.mixup), num_classes=num_classes)] if aug.mixup else []),
        *([v2.CutMix(alpha=float(aug.cutmix), num_classes=num_classes)] if aug.cutmix else []),
    ]
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def _normalize(spec: InputSpec) -> list:
    return [ToRGB(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]


def val_pipeline(spec: InputSpec) -> Pipeline:
    """The reference evaluation transform for an InputSpec."""
    return Pipeline(resize_stage(spec), v2.Compose([v2.CenterCrop((spec.height, spec.width)), *_normalize(spec)]))


def val_transform(spec: InputSpec) -> v2.Compose:
    """The contract's transform as one v2.Compose (uint8 (C,H,W) tensor in, float32 (3,h,w) out)."""
    p = val_pipeline(spec)
    return v2.Compose([p.resize, p.tail])


def train_pipeline(spec: InputSpec, aug: AugmentConfig) -> Pipeline:
    """Augmenting transform: mild geometry and photometry that keep defects recognisable."""
    size = (spec.height, spec.width)
    ops: list = []
    if aug.crop_scale < 1.0:
        ops.append(
            v2.RandomResizedCrop(
                size,
                scale=(aug.crop_scale, 1.0),
                ratio=(0.9, 1.1),
                interpolation=_INTERP[spec.interpolation],
                antialias=spec.interpolation not in PLAIN,
            )
        )
    else:
        ops.append(v2.CenterCrop(size))
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if aug.vflip:
        ops.append(v2.RandomVerticalFlip())
    if aug.rot90:
        ops.append(RandomRot90())
    ops.append(ToRGB())
    if aug.policy == "trivial":
        ops.append(v2.TrivialAugmentWide())
    elif aug.policy == "rand":
        ops.append(v2.RandAugment())
    if aug.brightness or aug.contrast or aug.saturation:
        ops.append(
            v2.ColorJitter(
                brightness=aug.brightness or None, contrast=aug.contrast or None, saturation=aug.saturation or None
            )
        )
    if aug.blur_prob > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=aug.blur_prob))
    ops += _normalize(spec)
    return Pipeline(resize_stage(spec), v2.Compose(ops))
