"""Faster R-CNN with an FPN over the project's backbones.

A trunk is the backbone cut into ordered stages; the outputs of the last stage at
strides 8, 16 and 32 feed a torchvision ``FeaturePyramidNetwork`` (plus its max-pool
level, so 4 maps: ``"0"``, ``"1"``, ``"2"``, ``"pool"``). Trunks:

* ``efficientnet_lite0`` (training.backbones, ImageNet weights offline): blocks 4/10/15 ->
  40/112/320 channels;
* ``mobilenet_v3_large``, ``resnet50`` (torchvision weights when cached, else
  ``WeightsUnavailableError`` saying where the file goes);
* ``tiny_det``: five stride-2 convs, for tests.

Defaults come from the issue-16 measurements (2-core CPU, lite0, 320 px): 150/150 test
proposals (RoI heads 298 -> 58 ms against torchvision's 1000/1000) and a 128-channel FPN
(134 -> 90 ms). Anchors are small (16 px at stride 8) with thin aspect ratios for scratches.
The model takes images in [0, 1] (RGB); its own transform normalises with the backbone's
mean/std and does not resize images already at ``image_size``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from runtime.inference.boxes import FUSION_IOU
from training.config_io import refuse_unknown
from training.detection.heads import BoxPredictor, DetectorConfigError, freeze_batchnorm
from training.detection.tv_detectors import COCO_DETECTORS

DEFAULT_DETECTOR_BACKBONE = "efficientnet_lite0"
# The project trunks' anchors: small (16 px at stride 8) with thin aspect ratios (h/w) for scratches.
TRUNK_ANCHORS: tuple[tuple[int, ...], tuple[float, ...]] = ((16, 32, 64, 128), (0.25, 0.5, 1.0, 2.0, 4.0))
TRUNKS: dict[str, Callable[[DetectorSpec], Trunk]] = {}


def trunk(name: str) -> Callable:
    """Register a trunk builder; refuses duplicates."""

    def deco(fn: Callable[[DetectorSpec], Trunk]) -> Callable[[DetectorSpec], Trunk]:
        if name in TRUNKS:
            raise ValueError(f"detector trunk {name!r} registered twice")
        TRUNKS[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class DetectorSpec:
    classes: tuple[str, ...]  # defect classes; label 0 is the background
    backbone: str = DEFAULT_DETECTOR_BACKBONE
    weights: str = "imagenet"  # "imagenet" | "none" | a backbone weights file
    image_size: tuple[int, int] = (320, 320)  # (H, W) model input, letterboxed
    fpn_channels: int = 128
    # None: the architecture's own (TRUNK_ANCHORS for the project trunks, COCO's for torchvision detectors)
    anchor_sizes: tuple[int, ...] | None = None  # pixels; project trunks: one per FPN map (s8, s16, s32, pool)
    aspect_ratios: tuple[float, ...] | None = None  # h/w
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 150
    rpn_post_nms_test: int = 150
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    # proposals sampled per image for the RoI loss; 128 not torchvision's 512: defect images hold 1-3 boxes, so
    # the extra samples are background, and fc6 on them was 55% of a training step (2.9 -> 1.4 s, 4 images, 320 px)
    box_batch_size_per_image: int = 128
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    # flip-TTA weighted box fusion IoU (evaluate --tta, and the bundle's output.fusion_iou for stations)
    fusion_iou: float = FUSION_IOU
    detections_per_img: int = 100
    representation_size: int = 1024  # TwoMLPHead width
    trainable_stages: int | None = None  # last N trunk stages train; None = all, 0 = trunk frozen
    frozen_bn: bool = True  # BatchNorm -> FrozenBatchNorm2d (batches of 2-8 images)
    # "backbone": only the trunk starts pretrained (``weights``); "coco": the whole detector from torchvision's
    # COCO checkpoint, box predictor replaced (backbone must be one of tv_detectors.COCO_DETECTORS)
    det_init: str = "backbone"
    det_weights: str | None = None  # the COCO checkpoint file; None: torch hub's cache

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise DetectorConfigError(f"model.classes: expected distinct class names, got {list(self.classes)}")
        if self.backbone not in TRUNKS and self.backbone not in COCO_DETECTORS:
            raise DetectorConfigError(
                f"model.backbone: {self.backbone!r} has no detector trunk; available: "
                f"{sorted(TRUNKS) + sorted(COCO_DETECTORS)}"
            )
        arch = COCO_DETECTORS.get(self.backbone)
        sizes, ratios = (arch.anchor_sizes, arch.aspect_ratios) if arch else TRUNK_ANCHORS
        if self.anchor_sizes is None:
            object.__setattr__(self, "anchor_sizes", sizes)
        if self.aspect_ratios is None:
            object.__setattr__(self, "aspect_ratios", ratios)
        for key in ("image_size", "anchor_sizes", "aspect_ratios"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if self.det_init not in ("backbone", "coco"):
            raise DetectorConfigError(f"model.det_init: expected 'backbone' or 'coco', got {self.det_init!r}")
        if self.det_init == "coco" and arch is None:
            raise DetectorConfigError(
                f"model.det_init: 'coco' needs a torchvision detector backbone ({', '.join(sorted(COCO_DETECTORS))}), "
                f"got {self.backbone!r}"
            )
        if arch is not None and self.det_init == "backbone" and self.weights != "none":
            raise DetectorConfigError(
                f"model.weights: {self.backbone} starts from COCO (--det-init coco) or random (--weights none); "
                "for an ImageNet-backbone start use the mobilenet_v3_large or resnet50 trunk"
            )
        if self.det_weights is not None and self.det_init != "coco":
            raise DetectorConfigError("model.det_weights: a COCO checkpoint file needs det_init 'coco'")
        if len(self.image_size) != 2 or min(self.image_size) < 32 or any(s % 32 for s in self.image_size):
            raise DetectorConfigError(f"model.image_size: expected (H, W), multiples of 32, got {self.image_size}")
        levels = 4 if arch is None else arch.levels if arch.per_level else None
        if levels is not None and len(self.anchor_sizes or ()) != levels:
            raise DetectorConfigError(
                f"model.anchor_sizes: expected {levels} sizes (one per FPN map), got {self.anchor_sizes}"
            )
        if not self.anchor_sizes or min(self.anchor_sizes) < 1:
            raise DetectorConfigError(f"model.anchor_sizes: expected positive sizes, got {self.anchor_sizes}")
        if not 0.0 < self.fusion_iou < 1.0:
            raise DetectorConfigError(f"model.fusion_iou: expected an IoU in (0, 1), got {self.fusion_iou!r}")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise DetectorConfigError(f"model.aspect_ratios: expected positive ratios, got {self.aspect_ratios}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.startswith(("rpn_", "box_batch", "detections", "fpn", "representation")) and (
                not isinstance(v, int) or v < 1
            ):
                raise DetectorConfigError(f"model.{f.name}: expected a positive integer, got {v!r}")
        if self.trainable_stages is not None and self.trainable_stages < 0:
            raise DetectorConfigError(f"model.trainable_stages: expected >= 0 or None, got {self.trainable_stages}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DetectorSpec:
        refuse_unknown(d, (f.name for f in fields(cls)), "model", DetectorConfigError)
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("classes", "image_size", "anchor_sizes", "aspect_ratios"):
            d[k] = list(d[k])
        return d


class Trunk(nn.Module):
    """Ordered stages; returns the outputs of ``taps`` (stage indices at strides 8/16/32) as "0","1","2"."""

    def __init__(
        self,
        stages: Sequence[nn.Module],
        taps: Sequence[int],
        channels: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages[: max(taps) + 1])  # stages past the last tap are not needed
        self.taps = tuple(taps)
        self.out_channels = list(channels)
        self.mean, self.std = list(mean), list(std)
        self.frozen: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.taps:
                out[str(self.taps.index(i))] = x
        return out

    def set_trainable(self, n: int | None) -> None:
        """Train the last ``n`` stages (None: all); frozen stages also keep BatchNorm in eval mode."""
        k = len(self.stages)
        n = k if n is None else min(n, k)
        self.frozen = tuple(range(k - n))
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i not in self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Trunk:
        super().train(mode)
        for i in self.frozen:
            self.stages[i].eval()
        return self


class FPNBackbone(nn.Module):
    def __init__(self, body: Trunk, channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def build_detector(spec: DetectorSpec, pretrained: bool = True) -> FasterRCNN:
    """A torchvision ``FasterRCNN`` for ``spec``; ``model.roi_heads.box_predictor`` is a :class:`BoxPredictor`.
    ``pretrained=False``: no weights are loaded (a checkpoint's will be)."""
    if spec.backbone in COCO_DETECTORS:
        from training.detection.tv_detectors import build_tv_detector

        model = build_tv_detector(spec, pretrained)
        model.detector_spec = spec
        return model
    if not pretrained:
        from dataclasses import replace

        spec = replace(spec, weights="none")
    body = TRUNKS[spec.backbone](spec)
    if spec.frozen_bn:
        freeze_batchnorm(body)
    body.set_trainable(spec.trainable_stages)
    backbone = FPNBackbone(body, spec.fpn_channels)
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in spec.anchor_sizes or ()),
        aspect_ratios=(tuple(spec.aspect_ratios or ()),) * len(spec.anchor_sizes or ()),
    )
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    head = TwoMLPHead(spec.fpn_channels * 7 * 7, spec.representation_size)
    h, w = spec.image_size
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=min(h, w),
        max_size=max(h, w),
        image_mean=body.mean,
        image_std=body.std,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=spec.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=spec.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=spec.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=spec.rpn_post_nms_test,
        rpn_batch_size_per_image=spec.rpn_batch_size_per_image,
        box_roi_pool=roi_pool,
        box_head=head,
        box_predictor=BoxPredictor(spec.representation_size, spec.classes),
        box_score_thresh=spec.box_score_thresh,
        box_nms_thresh=spec.box_nms_thresh,
        box_detections_per_img=spec.detections_per_img,
        box_batch_size_per_image=spec.box_batch_size_per_image,
    )
    model.detector_spec = spec
    return model


def trunk_stages(model: nn.Module) -> int:
    """How many trunk stages ``set_trunk_trainable`` counts."""
    body = model.backbone.body  # type: ignore[union-attr]
    if isinstance(body, Trunk):
        return len(body.stages)
    from training.detection.tv_detectors import body_stages

    return len(body_stages(model))


def set_trunk_trainable(model: nn.Module, n: int | None) -> None:
    """Train the last ``n`` trunk stages (None: all) of any detector ``build_detector`` makes."""
    body = model.backbone.body  # type: ignore[union-attr]
    if isinstance(body, Trunk):
        body.set_trainable(n)
    else:
        from training.detection.tv_detectors import set_trainable

        set_trainable(model, n)


# -- trunks ---------------------------------------------------------------------------------
def spec_of(model: nn.Module) -> DetectorSpec:
    """The ``DetectorSpec`` that ``build_detector`` attached to ``model``."""
    spec = getattr(model, "detector_spec", None)
    if not isinstance(spec, DetectorSpec):
        raise DetectorConfigError("model has no detector_spec (build it with build_detector)")
    return spec


def _probe_taps(stages: Sequence[nn.Module], size: int = 64) -> tuple[list[int], list[int]]:
    """Indices of the last stage at strides 8, 16, 32 and their channels (one eval forward)."""
    x = torch.zeros(1, 3, size, size)
    last: dict[int, tuple[int, int]] = {}
    with torch.no_grad():
        modes = [s.training for s in stages]
        for i, s in enumerate(stages):
            s.eval()
            x = s(x)
            last[size // x.shape[-1]] = (i, x.shape[1])
        for s, m in zip(stages, modes):
            s.train(m)
    missing = [s for s in (8, 16, 32) if s not in last]
    if missing:
        raise DetectorConfigError(f"trunk has no stage at stride(s) {missing}")
    return [last[s][0] for s in (8, 16, 32)], [last[s][1] for s in (8, 16, 32)]


def _registry_body(spec: DetectorSpec, input_override: dict | None = None) -> tuple[Any, Any]:
    from training.backbones import build_model, get_spec

    bspec = get_spec(spec.backbone)
    from dataclasses import replace

    inp = replace(bspec.default_input, **(input_override or {}))
    return build_model(spec.backbone, 2, weights=spec.weights, input_spec=inp).body, bspec


class _LiteBlock(nn.Module):
    """One MBConv block of the Lite0 port with its fixed drop-connect rate."""

    def __init__(self, block: nn.Module, rate: float) -> None:
        super().__init__()
        self.block, self.rate = block, rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=self.rate)


@trunk("efficientnet_lite0")
def _lite0(spec: DetectorSpec) -> Trunk:
    from training.backbone_lite import LITE0_REPEATS

    h, w = spec.image_size
    # TF-"same" padding is fixed at build time for the input size.
    body, bspec = _registry_body(spec, {"height": h, "width": w, "resize_size": max(h, w)})
    n = len(body._blocks)
    blocks = [_LiteBlock(b, body.drop_connect_rate * i / n) for i, b in enumerate(body._blocks)]
    stages: list[nn.Module] = [nn.Sequential(body._conv_stem, body._bn0, nn.ReLU6())]
    start = 0
    for r in LITE0_REPEATS:
        stages.append(nn.Sequential(*blocks[start : start + r]))
        start += r
    taps, channels = _probe_taps(stages)
    assert channels == [40, 112, 320], channels  # blocks 4/10/15
    return Trunk(stages, taps, channels, bspec.default_input.mean, bspec.default_input.std)


@trunk("mobilenet_v3_large")
def _mnv3(spec: DetectorSpec) -> Trunk:
    body, bspec = _registry_body(spec)
    stages = list(body.features)
    taps, channels = _probe_taps(stages)
    return Trunk(stages, taps, channels, bspec.default_input.mean, bspec.default_input.std)


@trunk("resnet50")
def _resnet50(spec: DetectorSpec) -> Trunk:
    body, bspec = _registry_body(spec)
    stages = [
        nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool),
        body.layer1,
        body.layer2,
        body.layer3,
        body.layer4,
    ]
    return Trunk(stages, [2, 3, 4], [512, 1024, 2048], bspec.default_input.mean, bspec.default_input.std)


@trunk("tiny_det")
def _tiny(spec: DetectorSpec) -> Trunk:
    """~30k parameters, random init: strides 2..32 with 8..48 channels."""
    if spec.weights != "none":
        raise DetectorConfigError("model.weights: tiny_det has no pretrained weights; use weights='none'")
    chans = (8, 16, 24, 32, 48)
    stages, cin = [], 3
    for c in chans:
        stages.append(
            nn.Sequential(
                nn.Conv2d(cin, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
            )
        )
        cin = c
    return Trunk(stages, [2, 3, 4], list(chans[2:]), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


__all__ = [
    "BoxPredictor",
    "DetectorConfigError",
    "DetectorSpec",
    "TRUNK_ANCHORS",
    "FPNBackbone",
    "TRUNKS",
    "Trunk",
    "build_detector",
    "freeze_batchnorm",
    "set_trunk_trainable",
    "trunk_stages",
    "trunk",
]
