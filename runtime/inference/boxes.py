"""Boxes on the station side (numpy + OpenCV, no torch): resize policy, box TTA merge, part verdict.

* :func:`fit` is the ONE resize/letterbox of a detector's input (training calls it too):
  it returns the model-input image and the :class:`Geometry` that maps boxes both ways,
  so boxes are reported in original image pixels.
* :func:`weighted_box_fusion` merges the boxes of flip-TTA views (after
  :func:`unflip_boxes` put them back in the unflipped frame).
* :class:`BoxPolicy` makes the part-level decision on boxes: per-class score thresholds,
  a minimum box area and an ``uncertain`` band.

Boxes are ``(N,4)`` float ``xyxy`` in pixel-edge coordinates: a box covering pixel
columns ``x0..x1`` inclusive is ``[x0, ., x1 + 1, .]`` (torchvision's convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.inference.preprocess import resize

BOX_POLICIES = ("letterbox", "stretch")
VERDICTS = ("ok", "uncertain", "defect")


class BoxError(ValueError):
    """Bad boxes or policy settings; the message names the key."""


def as_boxes(boxes: Any) -> np.ndarray:
    """Any (N,4)-like -> float32 (N,4); an empty input gives (0,4)."""
    b = np.asarray(boxes, dtype=np.float32)
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if b.ndim != 2 or b.shape[1] != 4:
        raise BoxError(f"boxes: expected shape (N, 4) xyxy, got {b.shape}")
    return b


def box_area(boxes: Any) -> np.ndarray:
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: Any, b: Any) -> np.ndarray:
    """(N,M) IoU of two xyxy box sets."""
    a, b = as_boxes(a), as_boxes(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


# -- resize policy -------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """How an original ``(src_h, src_w)`` image became the ``(dst_h, dst_w)`` model input.

    model = original * scale + pad (per axis); letterbox pads are centred.
    """

    src_h: int
    src_w: int
    dst_h: int
    dst_w: int
    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    def to_model(self, boxes: Any) -> np.ndarray:
        b = as_boxes(boxes).copy()
        b[:, 0::2] = b[:, 0::2] * self.scale_x + self.pad_x
        b[:, 1::2] = b[:, 1::2] * self.scale_y + self.pad_y
        return b

    def to_original(self, boxes: Any, clip: bool = True) -> np.ndarray:
        """Model-input boxes -> original image pixels (clipped to the image)."""
        b = as_boxes(boxes).astype(np.float32, copy=True)
        b[:, 0::2] = (b[:, 0::2] - self.pad_x) / self.scale_x
        b[:, 1::2] = (b[:, 1::2] - self.pad_y) / self.scale_y
        if clip:
            b[:, 0::2] = b[:, 0::2].clip(0, self.src_w)
            b[:, 1::2] = b[:, 1::2].clip(0, self.src_h)
        return b


def geometry(src_h: int, src_w: int, dst_h: int, dst_w: int, policy: str = "letterbox") -> Geometry:
    """The mapping :func:`fit` applies, without touching pixels."""
    if policy not in BOX_POLICIES:
        raise BoxError(f"input.resize_policy: expected one of {BOX_POLICIES} for a detector, got {policy!r}")
    if min(src_h, src_w, dst_h, dst_w) <= 0:
        raise BoxError(f"geometry: sizes must be positive, got {src_h}x{src_w} -> {dst_h}x{dst_w}")
    if policy == "stretch":
        return Geometry(src_h, src_w, dst_h, dst_w, dst_w / src_w, dst_h / src_h)
    s = min(dst_h / src_h, dst_w / src_w)
    nh, nw = min(dst_h, int(round(src_h * s))), min(dst_w, int(round(src_w * s)))
    # Scale per axis from the rounded size, so the image content and the boxes agree exactly.
    return Geometry(
        src_h, src_w, dst_h, dst_w, nw / src_w, nh / src_h, float((dst_w - nw) // 2), float((dst_h - nh) // 2)
    )


def fit(
    image: np.ndarray,
    height: int,
    width: int,
    policy: str = "letterbox",
    interpolation: str = "bilinear",
    pad_value: int = 0,
) -> tuple[np.ndarray, Geometry]:
    """uint8 (H,W[,C]) frame -> (height,width[,C]) model-size image and its :class:`Geometry`."""
    g = geometry(image.shape[0], image.shape[1], height, width, policy)
    nh, nw = int(round(g.src_h * g.scale_y)), int(round(g.src_w * g.scale_x))
    resized = resize(image, nh, nw, interpolation)
    if (nh, nw) == (height, width):
        return resized, g
    out = np.full((height, width, *image.shape[2:]), pad_value, dtype=image.dtype)
    y, x = int(g.pad_y), int(g.pad_x)
    out[y : y + nh, x : x + nw] = resized
    return out, g


def unflip_boxes(boxes: Any, width: int, height: int, view: str) -> np.ndarray:
    """Boxes found on a flipped view (``hflip``/``vflip``/``rot180``/``original``) -> the unflipped frame."""
    b = as_boxes(boxes).copy()
    if view in ("hflip", "rot180"):
        b[:, [0, 2]] = width - b[:, [2, 0]]
    if view in ("vflip", "rot180"):
        b[:, [1, 3]] = height - b[:, [3, 1]]
    if view not in ("original", "hflip", "vflip", "rot180"):
        raise BoxError(f"tta.views: box TTA supports original/hflip/vflip/rot180, got {view!r}")
    return b


# -- TTA merge ----------------------------------------------------------------------------
# IoU above which boxes of flip-TTA views are fused; a bundle may set its own (output.fusion_iou, e.g.
# lower for thin elongated defects whose flipped boxes overlap less).
FUSION_IOU = 0.55


def weighted_box_fusion(
    views: Sequence[tuple[Any, Any, Any]], iou_thr: float = FUSION_IOU, skip_thr: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted box fusion (Solovyev et al. 2021) of the detections of ``V`` views of one frame.

    ``views``: per view ``(boxes (N,4), scores (N,), labels (N,))`` in the same frame. Boxes of
    one label are visited by falling score; each joins the first fused box it overlaps with
    IoU > ``iou_thr`` (else starts one). A fused box is the score-weighted mean of its members;
    its score is the members' mean score times ``min(members, V) / V``, so a box seen in one view
    of two keeps half its score. Returns (boxes, scores, labels) by falling score.
    """
    n_views = max(1, len(views))
    rows = []
    for boxes, scores, labels in views:
        b, s, lab = as_boxes(boxes), np.asarray(scores, np.float32).reshape(-1), np.asarray(labels).reshape(-1)
        if not len(b) == len(s) == len(lab):
            raise BoxError(f"weighted_box_fusion: {len(b)} boxes, {len(s)} scores, {len(lab)} labels")
        keep = (s >= skip_thr) & np.isfinite(s) & np.isfinite(b).all(axis=1)
        rows += [(float(si), int(li), bi) for bi, si, li in zip(b[keep], s[keep], lab[keep])]
    out_b, out_s, out_l = [], [], []
    for label in sorted({r[1] for r in rows}):
        members: list[list[tuple[float, np.ndarray]]] = []
        fused: list[np.ndarray] = []
        for score, _, box in sorted((r for r in rows if r[1] == label), key=lambda r: -r[0]):
            j = -1
            if fused:
                ious = box_iou(box[None], np.stack(fused))[0]
                best = int(np.argmax(ious))
                j = best if ious[best] > iou_thr else -1
            if j < 0:
                members.append([(score, box)])
                fused.append(box.astype(np.float32))
            else:
                members[j].append((score, box))
                w = np.array([m[0] for m in members[j]], np.float32)
                fused[j] = (np.stack([m[1] for m in members[j]]) * w[:, None]).sum(0) / max(w.sum(), 1e-12)
        for m, f in zip(members, fused):
            out_b.append(f)
            out_s.append(np.mean([x[0] for x in m]) * min(len(m), n_views) / n_views)
            out_l.append(label)
    if not out_b:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    order = np.argsort(-np.asarray(out_s), kind="stable")
    return (
        np.stack(out_b).astype(np.float32)[order],
        np.asarray(out_s, np.float32)[order],
        np.asarray(out_l, np.int64)[order],
    )


# -- drawing ---------------------------------------------------------------------------------
BOX_COLOR = (0, 0, 255)  # BGR red


def draw_boxes(image: np.ndarray, detections: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """A BGR copy of a uint8 gray/BGR frame with each ``{"box", "score", "class"}`` outlined and labelled.

    Boxes are original-image pixel edges; the outline covers the box's first to last pixel.
    """
    import cv2

    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    for d in detections:
        x1, y1, x2, y2 = (float(v) for v in d["box"])
        p1 = (int(np.clip(np.floor(x1), 0, w - 1)), int(np.clip(np.floor(y1), 0, h - 1)))
        p2 = (int(np.clip(np.ceil(x2) - 1, 0, w - 1)), int(np.clip(np.ceil(y2) - 1, 0, h - 1)))
        cv2.rectangle(out, p1, p2, BOX_COLOR, thick)
        label = f"{d['class']} {float(d['score']):.2f}"
        cv2.putText(
            out,
            label,
            (p1[0], max(10, p1[1] - 3)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.35 * thick,
            BOX_COLOR,
            thick,
            cv2.LINE_AA,
        )
    return out


# -- part-level decision ---------------------------------------------------------------------
@dataclass(frozen=True)
class BoxVerdict:
    verdict: str  # "ok" | "uncertain" | "defect"
    defect_class: str | None  # class of the box behind a defect/uncertain verdict
    confidence: float  # that box's score; ok: 1 - best score of a box big enough (1.0: none)
    boxes: tuple[dict[str, Any], ...] = ()  # counted boxes: {"box", "score", "class", "status"}


@dataclass(frozen=True)
class BoxPolicy:
    """A part is defective when any box of area >= ``min_area`` scores >= its class threshold + band.

    Boxes within ``band`` of their threshold make the part ``uncertain`` (unless a box is
    a clear defect); boxes below ``threshold - band`` or smaller than ``min_area``
    (original pixels squared) are not counted. ``thresholds``: per class name, else
    ``default_threshold``.
    """

    default_threshold: float = 0.5
    thresholds: Mapping[str, float] = field(default_factory=dict)
    min_area: float = 0.0
    band: float = 0.0
    min_area_per_class: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", dict(self.thresholds))
        object.__setattr__(self, "min_area_per_class", dict(self.min_area_per_class))
        for key, v in [
            ("default_threshold", self.default_threshold),
            *((f"thresholds.{k}", v) for k, v in self.thresholds.items()),
        ]:
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise BoxError(f"decision.{key}: expected a score in [0, 1], got {v!r}")
        for key, v in [
            ("min_area", self.min_area),
            *((f"min_area_per_class.{k}", v) for k, v in self.min_area_per_class.items()),
        ]:
            if not isinstance(v, (int, float)) or v < 0:
                raise BoxError(f"decision.{key}: expected a non-negative area in pixels^2, got {v!r}")
        if not isinstance(self.band, (int, float)) or not 0.0 <= self.band < 0.5:
            raise BoxError(f"decision.uncertain_band: expected a number in [0, 0.5), got {self.band!r}")

    def check_classes(self, classes: Sequence[str]) -> None:
        """Refuse thresholds for classes the model does not have (typos silently do nothing otherwise)."""
        for where, names in (("thresholds", self.thresholds), ("min_area_per_class", self.min_area_per_class)):
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise BoxError(f"decision.{where}: {unknown} are not classes of the model {list(classes)}")

    def threshold(self, cls: str) -> float:
        return float(self.thresholds.get(cls, self.default_threshold))

    def decide(self, boxes: Any, scores: Any, labels: Any, classes: Sequence[str]) -> BoxVerdict:
        """Boxes in original pixels with label indices into ``classes`` -> the part's verdict."""
        b, s, lab = as_boxes(boxes), np.asarray(scores, np.float32).reshape(-1), np.asarray(labels).reshape(-1)
        areas = box_area(b)
        counted: list[dict[str, Any]] = []
        # status -> (margin, class, score) of its best box
        best: dict[str, tuple[float, str, float] | None] = {"defect": None, "uncertain": None}
        best_score = 0.0
        for box, score, label, area in zip(b, s, lab, areas):
            # A model's outputs are not trusted: unknown labels and non-finite values are never counted.
            if not (0 <= int(label) < len(classes) and np.isfinite(score) and np.isfinite(box).all()):
                continue
            cls = classes[int(label)]
            if area < self.min_area_per_class.get(cls, self.min_area):
                continue
            best_score = max(best_score, float(score))
            margin = float(score) - self.threshold(cls)
            status = "defect" if margin >= self.band else "uncertain" if margin >= -self.band else None
            if status is None:
                continue
            counted.append(
                {
                    "box": [round(float(v), 2) for v in box],
                    "score": round(float(score), 4),
                    "class": cls,
                    "status": status,
                }
            )
            cur = best[status]
            if cur is None or margin > cur[0]:
                best[status] = (margin, cls, float(score))
        for verdict in ("defect", "uncertain"):
            if (hit := best[verdict]) is not None:
                _, cls, top = hit
                return BoxVerdict(verdict, cls, top, tuple(counted))
        return BoxVerdict("ok", None, 1.0 - best_score, tuple(counted))


__all__ = [
    "BOX_POLICIES",
    "BoxError",
    "BoxPolicy",
    "BoxVerdict",
    "Geometry",
    "as_boxes",
    "box_area",
    "box_iou",
    "draw_boxes",
    "fit",
    "geometry",
    "unflip_boxes",
    "weighted_box_fusion",
    "FUSION_IOU",
]
