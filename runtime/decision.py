"""From model outputs to a verdict: postprocessors by task, then the decision policy.

A postprocessor turns raw outputs into per-frame :class:`Prediction` s with one
score per class in [0, 1] (classification: the class probability, averaged
over TTA views; detection: the best box score of that class, boxes kept). The
:class:`Decider` only sees those per-class scores, so a detection bundle uses
the same thresholds, ``uncertain`` band, messages and snapshots as a classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.bundle import Manifest
from runtime.config import ConfigError, DecisionConfig
from runtime.tta import average_views


@dataclass(frozen=True)
class Prediction:
    scores: np.ndarray  # (K,) float per class, manifest class order
    detections: tuple[dict[str, Any], ...] | None = None  # detection task: {"box", "score", "class"}


@dataclass(frozen=True)
class Decision:
    verdict: str  # "ok" | "defect" | "uncertain"
    defect_class: str | None  # the defect class behind a defect / uncertain verdict
    confidence: float  # score behind the verdict (ok: 1 - highest defect score)


class Postprocessor:
    supports_tta = False

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def __call__(self, outputs: Sequence[np.ndarray], n_frames: int, n_views: int) -> list[Prediction]:
        raise NotImplementedError


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

    def __call__(self, outputs: Sequence[np.ndarray], n_frames: int, n_views: int) -> list[Prediction]:
        x = np.asarray(outputs[0], dtype=np.float32)[: n_frames * n_views]  # (N*V, K)
        probs = softmax(x.copy()) if self.manifest.output.kind == "logits" else x
        probs = average_views(probs, n_views)  # average probabilities, not logits
        return [Prediction(scores=probs[i]) for i in range(n_frames)]


@postprocessor("detection")
class DetectionPostprocessor(Postprocessor):
    """(boxes (N,D,4), scores (N,D), labels (N,D)) in model-input pixels, as the manifest's box_format."""

    min_score = 0.05  # boxes below this are not reported

    def __call__(self, outputs: Sequence[np.ndarray], n_frames: int, n_views: int) -> list[Prediction]:
        boxes, scores, labels = (np.asarray(o) for o in outputs)
        classes = self.manifest.classes
        out = []
        for i in range(n_frames):
            per_class = np.zeros(len(classes), dtype=np.float32)
            dets = []
            for box, score, label in zip(boxes[i], scores[i], labels[i]):
                label, score = int(label), float(score)
                if score < self.min_score or not 0 <= label < len(classes):
                    continue
                per_class[label] = max(per_class[label], score)
                dets.append({"box": [round(float(v), 2) for v in box], "score": round(score, 4),
                             "class": classes[label]})
            out.append(Prediction(scores=per_class, detections=tuple(dets)))
        return out


def make_postprocessor(manifest: Manifest, n_views: int) -> Postprocessor:
    task = manifest.model.task
    if task not in POSTPROCESSORS:
        raise ConfigError(f"bundle task {task!r} has no postprocessor; known: {sorted(POSTPROCESSORS)}")
    post = POSTPROCESSORS[task](manifest)
    if n_views > 1 and not post.supports_tta:
        raise ConfigError(f"key 'tta.views': test-time augmentation is not supported for {task} bundles; "
                          "use views = [\"original\"]")
    return post


class Decider:
    """Per-class thresholds with an ``uncertain`` band around each.

    For each defect class c with threshold t: score >= t + band -> defect;
    t - band <= score < t + band -> uncertain; the defect class with the
    largest margin over its threshold decides. Otherwise ok.
    """

    def __init__(self, classes: Sequence[str], manifest_good: Sequence[str], cfg: DecisionConfig,
                 where: str = "decision") -> None:
        good = tuple(cfg.good_classes) if cfg.good_classes is not None else tuple(manifest_good)
        key = f"{where}.good_classes"
        if not good:
            raise ConfigError(f"key '{key}': the bundle names no good_classes; set [decision] good_classes")
        unknown = [g for g in good if g not in classes]
        if unknown:
            raise ConfigError(f"key '{key}': {unknown} are not classes of the bundle {list(classes)}")
        self.classes = tuple(classes)
        self.good = good
        self.defect_idx = np.array([i for i, c in enumerate(classes) if c not in good], dtype=np.int64)
        if self.defect_idx.size == 0:
            raise ConfigError(f"key '{key}': every class {list(classes)} is good; nothing could be a defect")
        for name in cfg.thresholds:
            if name not in classes or name in good:
                raise ConfigError(f"key '{where}.thresholds.{name}': not a defect class of the bundle; "
                                  f"defect classes are {[classes[i] for i in self.defect_idx]}")
        self.thresholds = np.array([cfg.thresholds.get(classes[i], cfg.default_threshold) for i in self.defect_idx],
                                   dtype=np.float32)
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


    def near(self, scores: np.ndarray, band: float) -> bool:
        """True when any defect class's score is within ``band`` of its threshold (a verdict TTA could flip)."""
        s = np.asarray(scores, dtype=np.float32)[self.defect_idx]
        return bool(np.any(np.abs(s - self.thresholds) < band))


def scores_dict(classes: Sequence[str], scores: np.ndarray, digits: int = 5) -> dict[str, float]:
    return {c: round(float(v), digits) for c, v in zip(classes, scores)}


def top(classes: Sequence[str], scores: np.ndarray) -> tuple[str, float]:
    i = int(np.argmax(scores))
    return classes[i], float(scores[i])


__all__ = ["Decider", "Decision", "Prediction", "POSTPROCESSORS", "make_postprocessor", "postprocessor",
           "scores_dict", "top"]
