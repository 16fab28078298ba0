"""Box-aware augmentation (torchvision.transforms.v2 + tv_tensors) at the model's input size.

The image reaches these transforms already letterboxed to the input size by
``runtime.inference.boxes.fit`` (the one resize, see training.detection.loader), as a uint8
``tv_tensors.Image`` with ``tv_tensors.BoundingBoxes`` (XYXY, pixel edges) and
1-based ``labels`` (0 = background, torchvision's convention). Geometry first, then
photometric jitter, then boxes cut to nothing are dropped and pixels scaled to [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from training.config_io import refuse_unknown
from training.data import DataError


@dataclass(frozen=True)
class AugmentSpec:
    hflip: float = 0.5  # probability
    vflip: float = 0.5
    rot90: bool = False  # random quarter turns; needs a square input (defects without a "down")
    brightness: float = 0.2  # ColorJitter factors (gray-safe: no saturation / hue)
    contrast: float = 0.2
    scale: tuple[float, float] = (0.8, 1.2)  # zoom about the centre, same canvas; (1, 1) = off
    min_box_size: float = 2.0  # pixels: boxes cut thinner than this by the zoom are dropped
    # Levers, off until measured (issue 27): copy-paste probability (defect crops of other training images
    # pasted onto an image, training.detection.copy_paste) and multi-scale factors of the input's short side
    # (each training image resized to one at random by the model's transform; evaluation stays at 1.0)
    copy_paste: float = 0.0
    multiscale: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "multiscale", tuple(float(v) for v in self.multiscale))
        if any(not 0.25 <= v <= 4.0 for v in self.multiscale):
            raise DataError(f"augment.multiscale: expected factors in [0.25, 4], got {self.multiscale}")
        for key in ("hflip", "vflip", "copy_paste"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise DataError(f"augment.{key}: expected a probability in [0, 1], got {v!r}")
        for key in ("brightness", "contrast", "min_box_size"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or v < 0:
                raise DataError(f"augment.{key}: expected a number >= 0, got {v!r}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise DataError(f"augment.scale: expected (low, high) with 0 < low <= high, got {self.scale}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugmentSpec:
        refuse_unknown(d, (f.name for f in fields(cls)), "augment", DataError)
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["multiscale"] = list(self.multiscale)
        return d


def rot90_boxes(boxes: torch.Tensor, canvas: tuple[int, int], k: int) -> torch.Tensor:
    """XYXY boxes on an (H,W) canvas turned ``k`` quarter turns counter-clockwise (``torch.rot90``)."""
    h, w = canvas
    b = boxes
    for _ in range(k % 4):
        x0, y0, x1, y1 = b.unbind(-1)
        b = torch.stack([y0, w - x1, y1, w - x0], dim=-1)
        h, w = w, h
    return b


class RandomRot90(v2.Transform):
    """0/90/180/270 degree turn (uniform), exact for pixels and boxes."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        k = params["k"]
        if k == 0:
            return inpt
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            if inpt.format != tv_tensors.BoundingBoxFormat.XYXY:
                raise ValueError("RandomRot90 needs XYXY boxes")
            h, w = inpt.canvas_size
            out = rot90_boxes(inpt.as_subclass(torch.Tensor), (h, w), k)
            return tv_tensors.wrap(out, like=inpt, canvas_size=(w, h) if k % 2 else (h, w))
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)) or type(inpt) is torch.Tensor:
            return (
                tv_tensors.wrap(torch.rot90(inpt.as_subclass(torch.Tensor), k, dims=(-2, -1)), like=inpt)
                if isinstance(inpt, tv_tensors.TVTensor)
                else torch.rot90(inpt, k, dims=(-2, -1))
            )
        return inpt


def geometric(aug: AugmentSpec, square: bool) -> list[v2.Transform]:
    ts: list[v2.Transform] = []
    if aug.hflip:
        ts.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip:
        ts.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rot90:
        if not square:
            raise DataError("augment.rot90: quarter turns need a square input size")
        ts.append(RandomRot90())
    if aug.scale != (1.0, 1.0):
        ts.append(v2.RandomAffine(degrees=0.0, scale=aug.scale, interpolation=v2.InterpolationMode.BILINEAR))
    return ts


def train_transform(aug: AugmentSpec, square: bool = True) -> v2.Compose:
    ts = geometric(aug, square)
    if aug.brightness or aug.contrast:
        ts.append(v2.ColorJitter(brightness=aug.brightness or None, contrast=aug.contrast or None))
    ts += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=aug.min_box_size),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(ts)


def eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


__all__ = ["AugmentSpec", "RandomRot90", "eval_transform", "rot90_boxes", "train_transform"]
