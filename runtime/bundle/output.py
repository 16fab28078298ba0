"""The ``output`` section of a bundle manifest: what the model returns, per task, and its graph shapes.

Classification: ``{"kind": "logits" | "probabilities", "names": [<one name>]}``, shape (N, K).
Detection: ``{"kind": "detections", "names": [boxes, scores, labels], "box_format": "xyxy",
"score_threshold"?, "max_detections"?, "fusion_iou"?}``, shapes (B,D,4), (B,D), (B,D); boxes in model-input
pixels, labels index ``classes``. Everything here comes from an untrusted bundle and is validated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.bundle.fs import BundleError, key_error, require
from runtime.inference.preprocess import InputSpec
from runtime.serving.messages import MAX_DETECTIONS

TASK_OUTPUT_KINDS = {"classification": ("logits", "probabilities"), "detection": ("detections",)}
BOX_FORMATS = ("xyxy",)  # model-input pixels, pixel-edge coordinates (runtime/inference/boxes.py)
# A detector's input keeps the whole frame (boxes map back to every original pixel): no center crop.
DETECTION_RESIZE_POLICIES = ("letterbox", "stretch")
DETECTION_KEYS = ("box_format", "score_threshold", "max_detections", "fusion_iou")


@dataclass(frozen=True)
class OutputSpec:
    kind: str
    names: tuple[str, ...]
    box_format: str | None = None  # detection: "xyxy"
    score_threshold: float | None = None  # detection: the operating box score threshold training chose
    max_detections: int | None = None  # detection: D of the (B,D,4)/(B,D)/(B,D) outputs
    fusion_iou: float | None = None  # detection: flip-TTA box fusion IoU (None: runtime.inference.boxes.FUSION_IOU)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "names": list(self.names)}
        for key in DETECTION_KEYS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def parse_output(o: Mapping[str, Any], task: str, spec: InputSpec, where: str) -> OutputSpec:
    """Validate ``output`` (and the input policy it needs) for ``task``; a classifier has no detection key."""
    kind = require(o, "kind", str, where, "output.")
    if kind not in TASK_OUTPUT_KINDS[task]:
        raise key_error(where, "output.kind", f"a {task} model outputs one of {TASK_OUTPUT_KINDS[task]}, got {kind!r}")
    names = require(o, "names", list, where, "output.")
    if not names or not all(isinstance(n, str) for n in names):
        raise key_error(where, "output.names", "expected a non-empty list of output tensor names")
    if task != "detection":
        extra = [k for k in DETECTION_KEYS if k in o]
        if extra:
            raise key_error(where, f"output.{extra[0]}", f"only a detection model's output has it (task is {task!r})")
        if spec.resize_policy == "letterbox":
            raise key_error(
                where,
                "input.resize_policy",
                "'letterbox' is a detector's policy; a classifier uses 'shorter_side_center_crop' or 'stretch'",
            )
        return OutputSpec(kind=kind, names=tuple(names))
    if len(names) != 3:
        raise key_error(where, "output.names", f"a detector has 3 outputs (boxes, scores, labels), got {names}")
    if spec.resize_policy not in DETECTION_RESIZE_POLICIES:
        raise key_error(
            where,
            "input.resize_policy",
            f"a detector needs one of {DETECTION_RESIZE_POLICIES} (boxes "
            f"map back to the whole frame), got {spec.resize_policy!r}",
        )
    box_format = require(o, "box_format", str, where, "output.")
    if box_format not in BOX_FORMATS:
        raise key_error(where, "output.box_format", f"expected one of {BOX_FORMATS}, got {box_format!r:.40}")
    thr = o.get("score_threshold")
    # `not 0 <= thr <= 1` is also true for NaN.
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0):
        raise key_error(where, "output.score_threshold", f"expected a score in [0, 1], got {thr!r:.40}")
    d = o.get("max_detections")
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DETECTIONS):
        raise key_error(where, "output.max_detections", f"expected an integer in [1, {MAX_DETECTIONS}], got {d!r:.40}")
    fi = o.get("fusion_iou")
    if fi is not None and (isinstance(fi, bool) or not isinstance(fi, (int, float)) or not 0.0 < fi < 1.0):
        raise key_error(where, "output.fusion_iou", f"expected an IoU in (0, 1), got {fi!r:.40}")
    return OutputSpec(
        kind=kind,
        names=tuple(names),
        box_format=box_format,
        score_threshold=float(thr) if thr is not None else None,
        max_detections=d,
        fusion_iou=float(fi) if fi is not None else None,
    )


def check_output_shapes(task: str, output: OutputSpec, n_classes: int, outputs: Sequence[Any], where: str) -> None:
    """Graph outputs (objects with .name and .shape; a dimension is an int or a symbol) vs the manifest."""
    names = [o.name for o in outputs]
    if task == "classification":
        dims = list(outputs[0].shape)
        if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != n_classes):
            raise BundleError(
                f"{where}: output {names[0]!r} has shape {dims}, expected (N, {n_classes}) "
                f"for the manifest's {n_classes} classes"
            )
        return
    dims = [list(o.shape) for o in outputs]
    batch: set[int] = set()
    per_image: set[int] = set()
    for name, shape, rank in zip(names, dims, (3, 2, 2)):
        if len(shape) != rank or (rank == 3 and isinstance(shape[2], int) and shape[2] != 4):
            layout = "(B, D, 4)" if rank == 3 else "(B, D)"
            raise BundleError(f"{where}: output {name!r} has shape {shape}, expected {layout} (box_format xyxy)")
        batch.update(d for d in shape[:1] if isinstance(d, int))
        per_image.update(d for d in shape[1:2] if isinstance(d, int))
    if len(batch) > 1 or len(per_image) > 1:
        raise BundleError(f"{where}: detection outputs {dims} disagree on the batch (B) or detections (D) dimension")
    if per_image:
        d = per_image.pop()
        if d > MAX_DETECTIONS:
            raise BundleError(
                f"{where}: outputs hold {d} detections per image, more than the {MAX_DETECTIONS} a verdict may carry"
            )
        if output.max_detections is not None and d != output.max_detections:
            raise BundleError(
                f"{where}: outputs hold {d} detections per image, manifest output.max_detections is "
                f"{output.max_detections}"
            )


__all__ = [
    "BOX_FORMATS",
    "DETECTION_RESIZE_POLICIES",
    "OutputSpec",
    "TASK_OUTPUT_KINDS",
    "check_output_shapes",
    "parse_output",
]
