"""Detection INT8 trials: the quantization scopes of a Faster R-CNN graph, one trial's record, and the
rule that picks the trial to ship (calibration.quantize_detection runs them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Node-name parts of torchvision's FasterRCNN in the exported graph (``/model/<module path>/...``).
PARTS = {
    "backbone": "/backbone/body/",
    "fpn": "/backbone/fpn/",
    "rpn": "/rpn/head/",
    "box_head": "/roi_heads/box_head/",
}
SCOPES: dict[str, tuple[str, ...]] = {
    "all": ("backbone", "fpn", "rpn", "box_head"),
    "convs": ("backbone", "fpn", "rpn"),
    "backbone_fpn": ("backbone", "fpn"),
    "backbone": ("backbone",),
}
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
GATE_METRIC = "map50"
DEFAULT_CALIBRATION_IMAGES = 200  # measured: 64 images dropped mAP@.5 2.7 points on the benchmark detector, 200 1.1
# Each scope is also tried with the first trunk nodes in float (the 3-channel stem and the first
# full-resolution depthwise conv: the classifiers' measured float prefix, calibration.cli).
DEFAULT_FLOAT_PREFIXES = (0, 2)


class DetectionQuantizationError(RuntimeError):
    """Detection INT8 could not run; the message names the file or step."""


@dataclass(frozen=True)
class ScopeTrial:
    scope: str
    nodes: int  # compute nodes quantized
    map50: float | None
    map: float | None
    drop_points: float  # mAP@.5 FP32 - INT8, in points (positive = INT8 worse)
    ms_per_image: float  # median ONNX Runtime latency, batch 1
    passed: bool
    part: dict[str, Any] = field(default_factory=dict)
    float_prefix: int = 0  # leading trunk compute nodes kept in float (stem, first depthwise, ...)

    @property
    def label(self) -> str:
        return self.scope if not self.float_prefix else f"{self.scope}-f{self.float_prefix}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "float_prefix": self.float_prefix,
            "nodes": self.nodes,
            "map50": self.map50,
            "map": self.map,
            "drop_points": round(self.drop_points, 4),
            "ms_per_image": round(self.ms_per_image, 3),
            "passed": self.passed,
            "part": self.part,
        }


@dataclass(frozen=True)
class DetectionCalibration:
    chosen: ScopeTrial | None
    trials: tuple[ScopeTrial, ...]
    reference: dict[str, Any]  # FP32 metrics on the same held-out images
    budget_points: float
    fp32_ms_per_image: float
    artifact: Path | None = None  # the written int8 model (None: gate failed, bundle unchanged)
    note: str = ""  # why the chosen trial, when it is not simply the fastest (or why none)
    # The chosen trial and FP32 on the report split (trials are chosen on another): {split, n, fp32, int8, drop_points}
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.chosen is not None


# A passing trial at most this much slower than the fastest passing one (relative) is a near-tie: the more
# accurate of the near-tied trials is chosen (issue 27: -0.89 vs -0.14 points for 1.5 ms went to the faster).
NEAR_TIE = 0.10
NEAR_TIE_GAIN = 0.25  # mAP@.5 points the near-tied trial must keep over the fastest (less is noise on small sets)


def choose_trial(trials: Sequence[ScopeTrial], near_tie: float = NEAR_TIE) -> tuple[ScopeTrial | None, str]:
    """The passing trial to ship and, when it is not the fastest, the trade in words."""
    passing = [t for t in trials if t.passed]
    if not passing:
        return None, ""
    fastest = min(passing, key=lambda t: t.ms_per_image)
    near = [t for t in passing if t.ms_per_image <= fastest.ms_per_image * (1 + near_tie)]
    best = min(near, key=lambda t: (round(t.drop_points, 6), t.ms_per_image))
    if best is fastest or fastest.drop_points - best.drop_points < NEAR_TIE_GAIN:
        return fastest, ""
    return best, (
        f"{best.label} over the fastest {fastest.label}: {best.drop_points:+.2f} vs {fastest.drop_points:+.2f} "
        f"points drop for +{best.ms_per_image - fastest.ms_per_image:.2f} ms/image (within {near_tie:.0%}, "
        f">= {NEAR_TIE_GAIN:g} points kept)"
    )


def scope_nodes(model_path: str | Path, scope: str) -> list[str]:
    """Names of the compute nodes of ``scope`` in the graph at ``model_path``."""
    import onnx

    if scope not in SCOPES:
        raise DetectionQuantizationError(f"scope {scope!r}: expected one of {list(SCOPES)}")
    parts = [PARTS[p] for p in SCOPES[scope]]
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in QUANTIZABLE_OPS and any(p in n.name for p in parts)]
