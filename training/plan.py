"""Training planned from the data: a fingerprint of the training split, then rules that pick settings.

As nnU-Net plans from a dataset fingerprint and Ultralytics checks anchors against the labels: the
fingerprint holds image sizes, box sizes and aspect ratios (detection), instances per class and the
image count; the rules pick input size, anchors, proposal counts, NMS, epochs, early-stop patience
and batch size. Every rule's reason is kept with its choice (printed, stored in the run card).

The rules' constants are first guesses, not measurements (issue 27): planning is ``--plan auto``,
off by default, until the bench (bench/bench_defaults.py) has run it on both benchmarks.
Pure numpy: no torch, so the rules are unit-tested on synthetic fingerprints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PLAN_MODES = ("off", "auto")
MIN_PER_CLASS = 50  # fewer instances of a class than this: warn that it is too small to learn from
MIN_IMAGES = 100
MIN_SIDE_PX = 8  # the 10th-percentile box's short side at model input, in pixels (the s8 map's cell)
SIZE_RANGE = (320, 1024)  # detector input long side (pixels) the planner chooses within
TARGET_STEPS = 1500  # optimizer steps a planned detector run aims at (epochs = steps / steps per epoch)
EPOCH_RANGE = (12, 100)
PIXEL_BUDGET = 4 * 320 * 320  # batch x H x W that fits a 2-core CPU step (today's default: 4 at 320 px)
ELONGATED = 3.0  # boxes whose p10 or p90 h/w ratio lies beyond 1/3 .. 3 are "elongated"


class PlanError(ValueError):
    """No plan can be made (no training images); the message says why."""


@dataclass(frozen=True)
class Fingerprint:
    n_images: int
    image_hw: tuple[float, float]  # median (H, W) in pixels
    instances: Mapping[str, int]  # boxes per class (detection) or images per class (classification)
    box_hw: tuple[tuple[float, float], ...] = ()  # (h, w) of every box, relative to its image's long side
    max_boxes_per_image: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "n_images": self.n_images,
            "image_hw": list(self.image_hw),
            "instances": dict(self.instances),
            "max_boxes_per_image": self.max_boxes_per_image,
        }
        if self.box_hw:
            hw = np.asarray(self.box_hw, dtype=np.float64)
            side = np.sqrt(hw[:, 0] * hw[:, 1])
            ratio = hw[:, 0] / np.maximum(hw[:, 1], 1e-9)
            d["boxes"] = len(hw)
            d["box_side_rel_p10_p50_p90"] = [round(float(v), 4) for v in np.percentile(side, [10, 50, 90])]
            d["box_ratio_hw_p10_p50_p90"] = [round(float(v), 3) for v in np.percentile(ratio, [10, 50, 90])]
        return d


def detection_fingerprint(samples: Sequence[Any], classes: Sequence[str]) -> Fingerprint:
    """From ``DetSample``-like objects (width, height, boxes xyxy in pixels, labels indexing ``classes``)."""
    if not samples:
        raise PlanError("the training split is empty: nothing to plan from")
    counts = {c: 0 for c in classes}
    hw: list[tuple[float, float]] = []
    most = 0
    for s in samples:
        long_side = float(max(s.width, s.height))
        most = max(most, len(s.boxes))
        for (x0, y0, x1, y1), lab in zip(s.boxes, s.labels):
            hw.append(((y1 - y0) / long_side, (x1 - x0) / long_side))
            counts[classes[lab]] += 1
    h = float(np.median([s.height for s in samples]))
    w = float(np.median([s.width for s in samples]))
    return Fingerprint(len(samples), (h, w), counts, tuple(hw), most)


def classification_fingerprint(sizes: Sequence[tuple[int, int]], labels: Sequence[str]) -> Fingerprint:
    """From (H, W) per image and its class name."""
    if not sizes:
        raise PlanError("the training split is empty: nothing to plan from")
    counts: dict[str, int] = {}
    for c in labels:
        counts[c] = counts.get(c, 0) + 1
    arr = np.asarray(sizes, dtype=np.float64)
    return Fingerprint(len(sizes), (float(np.median(arr[:, 0])), float(np.median(arr[:, 1]))), counts)


@dataclass(frozen=True)
class Plan:
    choices: Mapping[str, Any]  # setting name (a config key) -> value
    reasons: Mapping[str, str]  # setting name -> why
    warnings: tuple[str, ...] = ()
    fingerprint: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choices"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.choices.items()}
        d["warnings"] = list(self.warnings)
        return d

    def lines(self, applied: Sequence[str] | None = None) -> list[str]:
        """Human-readable plan; keys not in ``applied`` are marked as kept by the user's own setting."""
        out = [f"plan from {self.fingerprint.get('n_images', '?')} training images:"]
        for k, v in self.choices.items():
            mark = "" if applied is None or k in applied else "  (yours kept)"
            val = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, tuple) else v
            out.append(f"  {k} = {val}  -- {self.reasons[k]}{mark}")
        out += [f"  warning: {w}" for w in self.warnings]
        return out


def small_data_warnings(fp: Fingerprint, what: str = "boxes") -> tuple[str, ...]:
    """Warnings for classes with fewer than MIN_PER_CLASS instances and for fewer than MIN_IMAGES images."""
    out = []
    thin = {c: n for c, n in fp.instances.items() if n < MIN_PER_CLASS}
    if thin:
        out.append(
            f"too small to learn from: {', '.join(f'{c} ({n})' for c, n in sorted(thin.items()))} "
            f"have fewer than {MIN_PER_CLASS} {what}; expect unstable or poor results"
        )
    if fp.n_images < MIN_IMAGES:
        out.append(f"only {fp.n_images} training images (fewer than {MIN_IMAGES}): held-out metrics will be noisy")
    return tuple(out)


def _round32(v: float) -> int:
    return max(32, int(math.ceil(v / 32.0)) * 32)


def _pow2_floor(v: float) -> int:
    return 2 ** max(0, int(math.floor(math.log2(max(v, 1.0)))))


def _epochs(n_images: int, batch: int) -> tuple[int, int]:
    steps = max(1, math.ceil(n_images / batch))
    epochs = int(min(max(round(TARGET_STEPS / steps), EPOCH_RANGE[0]), EPOCH_RANGE[1]))
    return epochs, max(3, epochs // 5)


def plan_detection(
    fp: Fingerprint, *, levels: int = 4, per_level: bool = True, n_ratios: int | None = None, square: bool = True
) -> Plan:
    """Detector settings for ``fp``. ``levels``/``per_level``: the architecture's anchor layout (project trunks:
    4 maps, one size each); ``n_ratios``: keep this many aspect ratios (a COCO RPN head's count), None = free."""
    if not fp.box_hw:
        raise PlanError("the training split holds no boxes: nothing to plan anchors from")
    hw = np.asarray(fp.box_hw, dtype=np.float64)
    short = np.minimum(hw[:, 0], hw[:, 1])
    side = np.sqrt(hw[:, 0] * hw[:, 1])
    ratio = hw[:, 0] / np.maximum(hw[:, 1], 1e-9)
    c: dict[str, Any] = {}
    r: dict[str, str] = {}
    native = max(fp.image_hw)
    p10_short = float(np.percentile(short, 10))
    need = MIN_SIDE_PX / max(p10_short, 1e-6)  # long side that makes the p10 box's short side MIN_SIDE_PX
    size = min(max(_round32(need), SIZE_RANGE[0]), SIZE_RANGE[1], max(_round32(native), SIZE_RANGE[0]))
    if square:
        c["image_size"] = (size, size)
    else:
        h, w = fp.image_hw
        c["image_size"] = (_round32(size * h / native), _round32(size * w / native))
    r["image_size"] = (
        f"p10 box short side {p10_short * native:.1f} px of {native:.0f}; >= {MIN_SIDE_PX} px at input needs "
        f"{need:.0f} px, kept within {SIZE_RANGE} and the images' own size"
    )
    px = side * size
    base = max(8, _pow2_floor(float(np.percentile(px, 10))))
    n_sizes = levels if per_level else 5
    c["anchor_sizes"] = tuple(base * 2**i for i in range(n_sizes))
    r["anchor_sizes"] = (
        f"box sqrt(area) at input p10/p50/p90 = {np.percentile(px, 10):.0f}/{np.percentile(px, 50):.0f}/"
        f"{np.percentile(px, 90):.0f} px: powers of two from the p10"
    )
    lo, hi = (float(v) for v in np.percentile(ratio, [5, 95]))
    elongated = float(np.percentile(ratio, 10)) < 1 / ELONGATED or float(np.percentile(ratio, 90)) > ELONGATED
    k = n_ratios or (5 if elongated else 3)
    if elongated:
        lo, hi = min(max(lo, 1 / 16), 1.0), max(min(hi, 16.0), 1.0)
        span = max(abs(math.log2(lo)), abs(math.log2(hi)), 1.0)
        grid = (
            np.linspace(-span, span, k)
            if lo < 1 / ELONGATED and hi > ELONGATED
            else np.linspace(math.log2(lo), math.log2(hi), k)
        )
        ratios = tuple(sorted({round(float(2**g), 3) for g in grid} | ({1.0} if n_ratios is None else set())))
        c["aspect_ratios"] = ratios[:k] if n_ratios else ratios
        r["aspect_ratios"] = f"elongated boxes: h/w p5..p95 = {lo:.3g}..{hi:.3g}, covered in log steps"
        c["box_nms_thresh"] = 0.4
        r["box_nms_thresh"] = "elongated boxes: fragments along one thin defect overlap little, so NMS at IoU 0.4"
        c["fusion_iou"] = 0.4
        r["fusion_iou"] = "elongated boxes: flipped views' boxes of one thin defect overlap less, fuse at IoU 0.4"
    else:
        c["aspect_ratios"] = (0.5, 1.0, 2.0)
        r["aspect_ratios"] = f"compact boxes: h/w p10..p90 within 1/{ELONGATED:g}..{ELONGATED:g}"
    most = max(1, fp.max_boxes_per_image)
    c["rpn_post_nms_test"] = c["rpn_pre_nms_test"] = int(min(max(150, 30 * most), 1000))
    r["rpn_post_nms_test"] = r["rpn_pre_nms_test"] = f"up to {most} boxes per image: 30 proposals each, >= 150"
    c["detections_per_img"] = int(min(max(100, 3 * most), 300))
    r["detections_per_img"] = f"3x the most boxes in one training image ({most}), >= 100"
    hh, ww = c["image_size"]
    c["batch_size"] = int(min(max(PIXEL_BUDGET // (hh * ww), 2), 8))
    r["batch_size"] = f"{PIXEL_BUDGET // 1024}k pixels per step at {hh}x{ww}"
    c["epochs"], c["patience"] = _epochs(fp.n_images, c["batch_size"])
    r["epochs"] = f"~{TARGET_STEPS} steps over {fp.n_images} images, within {EPOCH_RANGE}"
    r["patience"] = "a fifth of the epochs (>= 3) without val mAP@.5 gain"
    return Plan(c, r, small_data_warnings(fp, "boxes"), fp.to_dict())


CLASSIFIER_SIZES = (160, 192, 224, 256, 288, 320)


def plan_classification(fp: Fingerprint) -> Plan:
    """Classifier settings: input resolution from the images' own size, epochs and patience from the count."""
    short = min(fp.image_hw)
    size = max([s for s in CLASSIFIER_SIZES if s <= short] or [CLASSIFIER_SIZES[0]])
    c: dict[str, Any] = {"image_size": size}
    r = {"image_size": f"largest of {CLASSIFIER_SIZES} not above the images' median short side ({short:.0f} px)"}
    steps = max(1, math.ceil(fp.n_images / 32))
    c["epochs"] = int(min(max(round(600 / steps), 10), 60))
    r["epochs"] = f"~600 steps of 32 over {fp.n_images} images, within 10..60"
    c["patience"] = max(3, c["epochs"] // 5)
    r["patience"] = "a fifth of the epochs (>= 3) without val gain"
    return Plan(c, r, small_data_warnings(fp, "images"), fp.to_dict())


__all__ = [
    "Fingerprint",
    "MIN_PER_CLASS",
    "PLAN_MODES",
    "Plan",
    "PlanError",
    "classification_fingerprint",
    "detection_fingerprint",
    "plan_classification",
    "plan_detection",
    "small_data_warnings",
]
