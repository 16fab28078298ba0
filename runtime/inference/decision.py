"""From model outputs to a verdict: postprocessors by task, then the task's decision policy.

A postprocessor turns raw outputs into per-frame :class:`Prediction` s with one
score per class in [0, 1] (classification: the class probability, averaged over
TTA views; detection: the best box score of that class, boxes kept in original
image pixels). Its task's decider makes the verdict: :class:`Decider` on the
class scores (classification), :class:`BoxDecider` on the boxes (detection:
``runtime.inference.boxes.BoxPolicy``); both read the same ``[decision]`` keys and give the
same :class:`Decision`, so messages, metrics and snapshots are shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.bundle.manifest import Manifest
from runtime.config.station import DEFAULT_THRESHOLD, ConfigError, DecisionConfig
from runtime.inference.boxes import (
    FUSION_IOU,
    BoxError,
    BoxPolicy,
    Geometry,
    geometry,
    unflip_boxes,
    weighted_box_fusion,
)
from runtime.inference.tta import average_views
from runtime.serving.messages import MAX_DETECTIONS


@dataclass(frozen=True)
class Boxes:
    """A frame's detections, by falling score."""

    boxes: np.ndarray  # (M,4) float32 xyxy in original image pixels, clipped to the image
    scores: np.ndarray  # (M,) float32 in [0, 1]
    labels: np.ndarray  # (M,) int64 index into the manifest's classes


@dataclass(frozen=True)
class Prediction:
    scores: np.ndarray  # (K,) float per class, manifest class order
    boxes: Boxes | None = None  # detection task


@dataclass(frozen=True)
class Decision:
    verdict: str  # "ok" | "defect" | "uncertain"
    defect_class: str | None  # the defect class behind a defect / uncertain verdict
    confidence: float  # score behind the verdict (ok: 1 - highest defect score)
    # Detection: the boxes that decided (defect or uncertain), {"box": [x1,y1,x2,y2] original px, "score", "class"}
    detections: tuple[dict[str, Any], ...] = ()


class Postprocessor:
    supports_tta = False
    tta_views: frozenset[str] | None = None  # the TTA views it can merge; None: any
    adaptive_tta = True  # [tta] mode = "uncertain" (first-view scores, more views near a threshold)

    def __init__(self, manifest: Manifest, views: Sequence[str] = ("original",)) -> None:
        self.manifest = manifest
        self.views = tuple(views)

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        n_frames: int,
        n_views: int,
        geometries: Sequence[Geometry | None] | None = None,
    ) -> list[Prediction]:
        """Outputs of ``n_frames`` x ``n_views`` inputs (a frame's views adjacent, in ``views`` order)."""
        raise NotImplementedError

    def decider(self, cfg: DecisionConfig) -> Decider | BoxDecider:
        """This task's decision policy, configured from ``[decision]``."""
        m = self.manifest
        return Decider(m.classes, m.good_classes, cfg)


POSTPROCESSORS: dict[str, type[Postprocessor]] = {}


def postprocessor(task: str) -> Callable[[type[Postprocessor]], type[Postprocessor]]:
    """Register the postprocessor of a bundle task; refuses duplicates."""

    def deco(cls: type[Postprocessor]) -> type[Postprocessor]:
        if task in POSTPROCESSORS:
            raise ValueError(f"postprocessor for task {task!r} registered twice")
        POSTPROCESSORS[task] = cls
        return cls

    return deco


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


@postprocessor("classification")
class ClassificationPostprocessor(Postprocessor):
    supports_tta = True

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        n_frames: int,
        n_views: int,
        geometries: Sequence[Geometry | None] | None = None,
    ) -> list[Prediction]:
        x = np.asarray(outputs[0], dtype=np.float32)[: n_frames * n_views]  # (N*V, K)
        probs = softmax(x.copy()) if self.manifest.output.kind == "logits" else x
        probs = average_views(probs, n_views)  # average probabilities, not logits
        return [Prediction(scores=probs[i]) for i in range(n_frames)]


@postprocessor("detection")
class DetectionPostprocessor(Postprocessor):
    """(boxes (B,D,4) xyxy model-input pixels, scores (B,D), labels (B,D) indexing ``classes``) -> per frame
    the boxes in original pixels: each view's boxes flipped back, merged over the views by weighted
    box fusion, capped at ``max_detections``, mapped through the frame's Geometry and clipped.

    Rows below ``min_score`` (the graph's padding scores 0), of a good class (label 0 = background),
    with an unknown label or non-finite values are dropped: a model's outputs are not trusted.
    """

    supports_tta = True
    tta_views = frozenset({"original", "hflip", "vflip", "rot180"})
    adaptive_tta = False  # boxes are fused over the views, not averaged per class
    min_score = 0.05

    def __init__(self, manifest: Manifest, views: Sequence[str] = ("original",)) -> None:
        super().__init__(manifest, views)
        spec = manifest.input
        self.height, self.width = spec.height, spec.width
        self.max_detections = manifest.output.max_detections or MAX_DETECTIONS
        fused = manifest.output.fusion_iou
        self.fusion_iou = fused if fused is not None else FUSION_IOU
        self.good = np.array([c in manifest.good_classes for c in manifest.classes])
        self._same = geometry(spec.height, spec.width, spec.height, spec.width, spec.resize_policy)

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        n_frames: int,
        n_views: int,
        geometries: Sequence[Geometry | None] | None = None,
    ) -> list[Prediction]:
        if len(outputs) != 3:
            raise ValueError(f"a detector returns (boxes, scores, labels), got {len(outputs)} outputs")
        rows = n_frames * n_views
        boxes = np.asarray(outputs[0], dtype=np.float32)
        scores = np.asarray(outputs[1], dtype=np.float32)
        labels = np.asarray(outputs[2])
        if (
            boxes.ndim != 3
            or boxes.shape[2] != 4
            or boxes.shape[0] < rows
            or scores.shape != boxes.shape[:2]
            or labels.shape != boxes.shape[:2]
        ):
            raise ValueError(
                f"detector outputs {boxes.shape}, {scores.shape}, {labels.shape}: expected (B,D,4), "
                f"(B,D), (B,D) with B >= {rows}"
            )
        views = self.views[:n_views]
        if len(views) != n_views:
            raise ValueError(f"{n_views} views per frame, the postprocessor knows {list(self.views)}")
        n_classes = len(self.manifest.classes)
        lab = (
            np.where(np.isfinite(labels), labels, -1).astype(np.int64)
            if labels.dtype.kind == "f"
            else labels.astype(np.int64)
        )
        ok = (
            np.isfinite(scores)
            & (scores >= self.min_score)
            & (scores <= 1.0)
            & np.isfinite(boxes).all(axis=2)
            & (lab >= 0)
            & (lab < n_classes)
            & (lab == labels)
        )
        ok &= ~self.good[np.clip(lab, 0, n_classes - 1)]
        out = []
        for i in range(n_frames):
            per_view = []
            for v, view in enumerate(views):
                r = i * n_views + v
                keep = np.flatnonzero(ok[r])
                # Best first, at most max_detections per view: fusion is quadratic in the boxes, and a
                # graph with a symbolic D could return any number of them.
                keep = keep[np.argsort(-scores[r][keep], kind="stable")][: self.max_detections]
                b = boxes[r][keep]
                if view != "original":
                    b = unflip_boxes(b, self.width, self.height, view)
                per_view.append((b, scores[r][keep], lab[r][keep]))
            if n_views == 1:
                b, s, lb = per_view[0]
            else:
                b, s, lb = weighted_box_fusion(per_view, iou_thr=self.fusion_iou)
            b, s, lb = b[: self.max_detections], s[: self.max_detections], lb[: self.max_detections]
            given = geometries[i] if geometries is not None else None
            b = (given or self._same).to_original(b, clip=True)
            proper = (b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])  # an inverted box is no detection
            b, s, lb = b[proper], s[proper], lb[proper]
            per_class = np.zeros(n_classes, dtype=np.float32)
            np.maximum.at(per_class, lb, s)
            per_class[self.good] = 1.0 - (float(s.max()) if s.size else 0.0)  # good: no defect box at all
            out.append(Prediction(scores=per_class, boxes=Boxes(b, s, lb)))
        return out

    def decider(self, cfg: DecisionConfig) -> BoxDecider:
        return BoxDecider(self.manifest, cfg)


def make_postprocessor(manifest: Manifest, views: Sequence[str] = ("original",)) -> Postprocessor:
    """The bundle task's postprocessor for the configured TTA ``views``; ConfigError naming ``tta.views``."""
    task = manifest.model.task
    if task not in POSTPROCESSORS:
        raise ConfigError(f"bundle task {task!r} has no postprocessor; known: {sorted(POSTPROCESSORS)}")
    post = POSTPROCESSORS[task](manifest, views)
    if len(views) > 1 and not post.supports_tta:
        raise ConfigError(
            f"key 'tta.views': test-time augmentation is not supported for {task} bundles; use views = [\"original\"]"
        )
    if post.tta_views is not None and not set(views) <= post.tta_views:
        bad = [v for v in views if v not in post.tta_views]
        raise ConfigError(
            f"key 'tta.views': {bad} cannot be merged for a {task} bundle; use views from {sorted(post.tta_views)}"
        )
    return post


def _good_classes(
    classes: Sequence[str], manifest_good: Sequence[str], cfg: DecisionConfig, where: str
) -> tuple[tuple[str, ...], np.ndarray]:
    """The good classes ([decision] good_classes, else the bundle's) and the defect class indices."""
    good = tuple(cfg.good_classes) if cfg.good_classes is not None else tuple(manifest_good)
    key = f"{where}.good_classes"
    if not good:
        raise ConfigError(f"key '{key}': the bundle names no good_classes; set [decision] good_classes")
    unknown = [g for g in good if g not in classes]
    if unknown:
        raise ConfigError(f"key '{key}': {unknown} are not classes of the bundle {list(classes)}")
    defect_idx = np.array([i for i, c in enumerate(classes) if c not in good], dtype=np.int64)
    if defect_idx.size == 0:
        raise ConfigError(f"key '{key}': every class {list(classes)} is good; nothing could be a defect")
    for name in cfg.thresholds:
        if name not in classes or name in good:
            raise ConfigError(
                f"key '{where}.thresholds.{name}': not a defect class of the bundle; "
                f"defect classes are {[classes[i] for i in defect_idx]}"
            )
    return good, defect_idx


class Decider:
    """Per-class thresholds with an ``uncertain`` band around each.

    For each defect class c with threshold t: score >= t + band -> defect;
    t - band <= score < t + band -> uncertain; the defect class with the
    largest margin over its threshold decides. Otherwise ok.
    """

    def __init__(
        self, classes: Sequence[str], manifest_good: Sequence[str], cfg: DecisionConfig, where: str = "decision"
    ) -> None:
        self.classes = tuple(classes)
        self.good, self.defect_idx = _good_classes(classes, manifest_good, cfg, where)
        default = cfg.default_threshold if cfg.default_threshold is not None else DEFAULT_THRESHOLD
        self.thresholds = np.array([cfg.thresholds.get(classes[i], default) for i in self.defect_idx], dtype=np.float32)
        self.band = float(cfg.uncertain_band)

    def __call__(self, scores: np.ndarray) -> Decision:
        s = np.asarray(scores, dtype=np.float32)[self.defect_idx]
        margin = s - self.thresholds
        best = int(np.argmax(margin))
        cls = self.classes[int(self.defect_idx[best])]
        if margin[best] >= self.band:
            return Decision("defect", cls, float(s[best]))
        if margin[best] >= -self.band:
            return Decision("uncertain", cls, float(s[best]))
        return Decision("ok", None, float(1.0 - s.max()))

    def decide(self, pred: Prediction) -> Decision:
        return self(pred.scores)

    def near(self, scores: np.ndarray, band: float) -> bool:
        """True when any defect class's score is within ``band`` of its threshold (a verdict TTA could flip)."""
        s = np.asarray(scores, dtype=np.float32)[self.defect_idx]
        return bool(np.any(np.abs(s - self.thresholds) < band))


class BoxDecider:
    """A detector's part verdict: :class:`runtime.inference.boxes.BoxPolicy` on the boxes of the defect classes.

    ``[decision]``: ``thresholds`` per defect class (box score), ``default_threshold`` (unset: the
    bundle's ``output.score_threshold``, else 0.5), ``uncertain_band``, ``min_box_area`` (original
    pixels^2), ``good_classes``.
    """

    def __init__(self, manifest: Manifest, cfg: DecisionConfig, where: str = "decision") -> None:
        self.classes = manifest.classes
        self.good, defect_idx = _good_classes(manifest.classes, manifest.good_classes, cfg, where)
        self.is_defect = np.zeros(len(self.classes), dtype=bool)
        self.is_defect[defect_idx] = True
        default = cfg.default_threshold
        if default is None:
            default = (
                manifest.output.score_threshold if manifest.output.score_threshold is not None else DEFAULT_THRESHOLD
            )
        try:
            self.policy = BoxPolicy(
                default_threshold=default,
                thresholds=dict(cfg.thresholds),
                min_area=cfg.min_box_area,
                band=cfg.uncertain_band,
            )
        except BoxError as exc:  # "decision.<key>: ..." -> the config's error form
            key, _, why = str(exc).partition(": ")
            raise ConfigError(f"key '{key.replace('decision.', where + '.', 1)}': {why}") from None

    def decide(self, pred: Prediction) -> Decision:
        b = pred.boxes
        if b is None or not len(b.scores):
            return Decision("ok", None, 1.0)
        keep = self.is_defect[b.labels]
        v = self.policy.decide(b.boxes[keep], b.scores[keep], b.labels[keep], self.classes)
        dets = tuple({"box": d["box"], "score": d["score"], "class": d["class"]} for d in v.boxes)
        return Decision(v.verdict, v.defect_class, v.confidence, dets)

    def near(self, scores: np.ndarray, band: float) -> bool:
        raise NotImplementedError("adaptive TTA is refused for detection bundles (key 'tta.mode')")


def scores_dict(classes: Sequence[str], scores: np.ndarray, digits: int = 5) -> dict[str, float]:
    return {c: round(float(v), digits) for c, v in zip(classes, scores)}


def top(classes: Sequence[str], scores: np.ndarray) -> tuple[str, float]:
    i = int(np.argmax(scores))
    return classes[i], float(scores[i])


__all__ = [
    "BoxDecider",
    "Boxes",
    "Decider",
    "Decision",
    "DetectionPostprocessor",
    "Prediction",
    "POSTPROCESSORS",
    "make_postprocessor",
    "postprocessor",
    "scores_dict",
    "top",
]
