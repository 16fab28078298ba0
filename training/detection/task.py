"""The detector as a task kind: its config, data (with ``--plan auto``), model and the engine's
step and eval hooks. ``TASK`` is what ``defectscope.tasks`` registers for "detection";
``training.classification.task`` has the same shape for the classifier.

``DetectionTask.step``: a batch ``(list of (3,H,W) images, list of targets)`` goes through
torchvision's ``FasterRCNN`` in train mode; the task loss is the sum of its loss dict
(``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``), each
reported as a named part. ``evaluate``: COCO mAP (pycocotools) plus the station's
part-level verdict (``runtime.inference.boxes.BoxPolicy``). The monitor is val mAP@.5.

``--plan auto``: the training split's fingerprint -> settings the user did not set. A user's own
setting always wins: model keys present in ``cfg.model`` and run keys named in ``cfg.pinned`` (the
CLI pins every flag and config-file key given) are kept, the rest planned (training.plan has the
rules). The small-data warning is given whatever the mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runtime.inference.boxes import BoxPolicy
from training.detection.coco_eval import coco_metrics, part_metrics
from training.detection.config import DetExtendConfig, DetTrainConfig, detector_spec
from training.detection.datasets import DetSplits, resolve_detection
from training.detection.formats import DetSample
from training.detection.tv_detectors import COCO_DETECTORS
from training.engine import Engine, StepResult, TaskKind, seed_everything
from training.plan import Plan, detection_fingerprint, plan_detection, small_data_warnings

MONITOR = "map50"


@dataclass
class DetPredictions:
    """Ground truth and per-image ``(boxes (N,4) original px, scores, labels 0-based)`` in the same order."""

    samples: Sequence[DetSample]
    predictions: Sequence[tuple[Any, Any, Any]]


def move_targets(targets: Sequence[dict[str, Any]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Only what the detector reads; ``BoundingBoxes`` become plain tensors (float32 xyxy)."""
    return [
        {
            "boxes": torch.as_tensor(t["boxes"]).as_subclass(torch.Tensor).float().reshape(-1, 4).to(device),
            "labels": torch.as_tensor(t["labels"]).long().to(device),
        }
        for t in targets
    ]


@dataclass
class DetectionTask:
    score_threshold: float = 0.5  # part-level verdict: a part is defective when a box scores >= this

    def step(self, model: nn.Module, batch: Any, engine: Engine) -> StepResult:
        images, targets = batch
        images = [im.to(engine.device, non_blocking=True).float() for im in images]
        losses = model(images, move_targets(targets, engine.device))
        if not isinstance(losses, dict) or not losses:
            raise TypeError("a detector in train mode must return its loss dict (torchvision FasterRCNN)")
        loss = sum(v.float() for v in losses.values())
        return StepResult(loss, len(images), 0, {k: float(v.detach()) for k, v in losses.items()})

    def policy(self) -> BoxPolicy:
        return BoxPolicy(default_threshold=self.score_threshold)

    def evaluate(self, preds: DetPredictions, classes: Sequence[str]) -> dict[str, Any]:
        m = coco_metrics(preds.samples, preds.predictions, classes)
        m["part"] = part_metrics(preds.samples, preds.predictions, classes, self.policy())
        return m


def monitor_value(metrics: dict[str, Any]) -> float:
    """val mAP@.5; no ground-truth boxes at all (None) scores 0."""
    v = metrics.get(MONITOR)
    return float(v) if v is not None else 0.0


# -- data and the plan -------------------------------------------------------------------------
def load_data(cfg: DetTrainConfig, echo: Callable[[str], None] = print) -> DetSplits:
    """The config's splits; bad annotations are skipped, counted and named here."""
    splits = resolve_detection(cfg.data)
    counts = splits.report.counts()
    if counts:
        echo(f"bad annotations skipped: {counts} (first: {splits.report.problems[0]})")
    return splits


RUN_KEYS = ("epochs", "patience", "batch_size")  # planned DetTrainConfig keys; the rest are DetectorSpec keys


def make_plan(cfg: DetTrainConfig, samples: Sequence[Any], classes: Sequence[str]) -> Plan:
    backbone = cfg.model.get("backbone")
    arch = COCO_DETECTORS.get(str(backbone)) if backbone else None
    fp = detection_fingerprint(samples, classes)
    if arch is None:
        return plan_detection(fp)
    coco = cfg.model.get("det_init") == "coco"
    # A COCO start keeps its RPN head's anchor count (3 ratios) so that head loads whole.
    return plan_detection(fp, levels=arch.levels, per_level=arch.per_level, n_ratios=3 if coco else None)


def apply_plan(cfg: DetTrainConfig, plan: Plan) -> tuple[DetTrainConfig, list[str]]:
    """``cfg`` with the plan's choices for every key the user left unset; also the keys applied."""
    model, run, applied = dict(cfg.model), dict[str, Any](), list[str]()
    for k, v in plan.choices.items():
        if k in RUN_KEYS:
            if k not in cfg.pinned:
                run[k] = v
                applied.append(k)
        elif k not in cfg.model:
            model[k] = v
            applied.append(k)
    if "batch_size" in run and "lr" not in cfg.pinned:
        run["lr"] = cfg.lr * run["batch_size"] / cfg.batch_size  # linear scaling from the default's batch
    return cfg.with_(model=model, **run), applied


def warn_small_data(
    samples: Sequence[Any], classes: Sequence[str], echo: Callable[[str], None], present_only: bool = False
) -> None:
    """Echo the small-data warnings; ``present_only``: classes absent from ``samples`` are not named (extend:
    old classes come from the source run)."""
    fp = detection_fingerprint(samples, classes)
    if present_only:
        from dataclasses import replace

        fp = replace(fp, instances={c: n for c, n in fp.instances.items() if n})
    for w in small_data_warnings(fp):
        echo(f"warning: {w}")


def plan_run(
    cfg: DetTrainConfig, samples: Sequence[Any], classes: Sequence[str], echo: Callable[[str], None]
) -> tuple[DetTrainConfig, dict[str, Any] | None]:
    """Warn on small data; with ``cfg.plan == "auto"`` plan and apply. Returns the config and the plan record."""
    if cfg.plan != "auto":
        warn_small_data(samples, classes, echo)
        return cfg, None
    plan = make_plan(cfg, samples, classes)
    cfg, applied = apply_plan(cfg, plan)
    for line in plan.lines(applied):
        echo(line)
    return cfg, {**plan.to_dict(), "applied": applied}


# -- model ---------------------------------------------------------------------------------------
def build_model(cfg: DetTrainConfig, classes: Sequence[str]) -> nn.Module:
    """The config's detector for ``classes``; its random init is seeded by ``cfg.seed`` alone."""
    from training.detection.model import build_detector

    spec = detector_spec(classes, cfg.model)
    seed_everything(cfg.seed)
    return build_detector(spec)


TASK = TaskKind(
    name="detection",
    config=DetTrainConfig,
    extend_config=DetExtendConfig,
    load_data=load_data,
    build_model=build_model,
    hooks=DetectionTask,
    commands={
        "train": "training.detection.cli:train_main",
        "evaluate": "training.detection.evaluate:main",
        "extend": "training.detection.cli:extend_main",
    },
)

__all__ = [
    "MONITOR",
    "RUN_KEYS",
    "TASK",
    "DetPredictions",
    "DetectionTask",
    "apply_plan",
    "build_model",
    "load_data",
    "make_plan",
    "monitor_value",
    "move_targets",
    "plan_run",
    "warn_small_data",
]
