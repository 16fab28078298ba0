"""torchvision's own Faster R-CNN architectures, optionally started from their COCO weights.

``--backbone`` names one of :data:`COCO_DETECTORS`; ``--det-init coco`` loads the whole detector
(backbone, FPN, RPN, RoI box head) from torchvision's COCO checkpoint, found in torch hub's cache
(``$TORCH_HOME/hub/checkpoints``) or given by ``--det-weights FILE``, and replaces only the box
predictor (91 COCO classes) by a :class:`~training.detection.model.BoxPredictor` for the data's
classes: torchvision's fine-tuning recipe. ``--det-init backbone`` with ``--weights none`` is a
random start (tests); the ImageNet-backbone start of these trunks is the project's
``mobilenet_v3_large`` / ``resnet50`` trunks.

Anchors: the architecture's COCO anchors unless ``anchor_sizes`` / ``aspect_ratios`` are set;
when the anchors per location change, the RPN's two output convs start afresh (named in the log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision.models.detection import FasterRCNN

DetectorSpec = Any  # training.detection.model.DetectorSpec (which imports this module)

log = logging.getLogger(__name__)

PREDICTOR = "roi_heads.box_predictor."


@dataclass(frozen=True)
class CocoArch:
    builder: str  # torchvision.models.detection function
    weights: str  # torchvision weights enum of the COCO checkpoint
    levels: int  # FPN maps the RPN runs on
    per_level: bool  # True: one anchor size per map; False: every size on every map
    anchor_sizes: tuple[int, ...]  # torchvision's COCO anchors (pixels)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)


COCO_DETECTORS: dict[str, CocoArch] = {
    "fasterrcnn_resnet50_fpn_v2": CocoArch(
        "fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1", 5, True, (32, 64, 128, 256, 512)
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": CocoArch(
        "fasterrcnn_mobilenet_v3_large_fpn",
        "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
        3,
        False,
        (32, 64, 128, 256, 512),
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": CocoArch(
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1",
        3,
        False,
        (32, 64, 128, 256, 512),
    ),
}


def coco_file_name(backbone: str) -> str:
    """The file name torch hub caches ``backbone``'s COCO checkpoint under."""
    import os

    from torchvision.models import get_weight

    return os.path.basename(get_weight(COCO_DETECTORS[backbone].weights).url)


def coco_state(spec: DetectorSpec) -> tuple[dict[str, torch.Tensor], str]:
    """The COCO state dict for ``spec`` (``det_weights`` file, else the hub cache / download) and its source."""
    from training.weights import load_state_file, torchvision_state

    if spec.det_weights:
        state = load_state_file(spec.det_weights)
        src = str(spec.det_weights)
    else:
        state, path = torchvision_state(COCO_DETECTORS[spec.backbone].weights, flag="--det-weights")
        src = str(path)
    # Checkpoints saved from DataParallel / DDP carry a "module." prefix.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, src


def load_coco(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load everything but the box predictor; returns the model keys that start afresh (the predictor's,
    RPN outputs whose anchor count changed). A key that fits nowhere is a ValueError naming ``source``."""
    own = model.state_dict()
    fresh = [k for k in own if k.startswith(PREDICTOR)]
    keep: dict[str, torch.Tensor] = {}
    unexpected = []
    for k, v in state.items():
        if k.startswith(PREDICTOR):
            continue
        if k not in own:
            unexpected.append(k)
        elif own[k].shape != v.shape:
            if k.startswith(("rpn.head.cls_logits.", "rpn.head.bbox_pred.")):
                fresh.append(k)  # anchors per location differ from COCO's
            else:
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the detector {tuple(own[k].shape)}")
        else:
            keep[k] = v
    # COCO checkpoints hold FrozenBatchNorm (no num_batches_tracked); random-init files hold them.
    missing = [k for k in own if k not in keep and k not in fresh and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        raise ValueError(
            f"{source}: not a {type(model).__name__} checkpoint of this architecture "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})"
        )
    model.load_state_dict(keep, strict=False)
    return fresh


def body_stages(model: nn.Module) -> list[nn.Module]:
    """The trunk's ordered stages: the body's child modules that hold parameters."""
    body: nn.Module = model.backbone.body  # type: ignore[union-attr,assignment]
    return [m for m in body.children() if any(True for _ in m.parameters())]


def set_trainable(model: nn.Module, n: int | None) -> None:
    """Train the last ``n`` trunk stages (None: all)."""
    stages = body_stages(model)
    k = len(stages) if n is None else min(n, len(stages))
    for i, stage in enumerate(stages):
        for p in stage.parameters():
            p.requires_grad_(i >= len(stages) - k)


def build_tv_detector(spec: DetectorSpec, pretrained: bool = True) -> FasterRCNN:
    """torchvision's ``spec.backbone`` detector for ``spec``; COCO weights when ``det_init == "coco"``."""
    from torchvision.models import detection as tvd
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    from training.detection.heads import BoxPredictor, freeze_batchnorm

    arch = COCO_DETECTORS[spec.backbone]
    h, w = spec.image_size
    model = getattr(tvd, arch.builder)(
        weights=None,
        weights_backbone=None,
        num_classes=91,
        min_size=min(h, w),
        max_size=max(h, w),
        rpn_pre_nms_top_n_train=spec.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=spec.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=spec.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=spec.rpn_post_nms_test,
        rpn_batch_size_per_image=spec.rpn_batch_size_per_image,
        box_score_thresh=spec.box_score_thresh,
        box_nms_thresh=spec.box_nms_thresh,
        box_detections_per_img=spec.detections_per_img,
        box_batch_size_per_image=spec.box_batch_size_per_image,
    )
    sizes = tuple(spec.anchor_sizes or arch.anchor_sizes)
    ratios = tuple(spec.aspect_ratios or arch.aspect_ratios)
    per_map = tuple((s,) for s in sizes) if arch.per_level else (sizes,) * arch.levels
    model.rpn.anchor_generator = AnchorGenerator(per_map, (ratios,) * arch.levels)
    n_anchors = model.rpn.anchor_generator.num_anchors_per_location()[0]
    head: Any = model.rpn.head
    if head.cls_logits.out_channels != n_anchors:
        ch = head.cls_logits.in_channels
        fresh = RPNHead(ch, n_anchors)  # only its two output convs are taken
        head.cls_logits, head.bbox_pred = fresh.cls_logits, fresh.bbox_pred
    if pretrained and spec.det_init == "coco":
        state, src = coco_state(spec)
        fresh_keys = load_coco(model, state, src)
        rpn_fresh = sorted({k.rsplit(".", 1)[0] for k in fresh_keys if not k.startswith(PREDICTOR)})
        log.info("COCO weights from %s; fresh: box predictor%s", src, f", {', '.join(rpn_fresh)}" if rpn_fresh else "")
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = BoxPredictor(in_features, spec.classes)
    if spec.frozen_bn:
        freeze_batchnorm(model)
    set_trainable(model, spec.trainable_stages)
    return model


__all__ = [
    "COCO_DETECTORS",
    "CocoArch",
    "body_stages",
    "build_tv_detector",
    "coco_file_name",
    "load_coco",
    "set_trainable",
]
