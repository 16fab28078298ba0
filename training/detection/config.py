"""``DetTrainConfig``: one frozen, validated configuration of a detector training run.

Every default has one definition: the detector's in ``DetectorSpec`` (training.detection.model),
the data's in ``DetectionSpec``, augmentation's in ``AugmentSpec``, the optimisation's here.
The CLI help reads them from these dataclasses (``field_defaults``), the config file and the
saved ``config.json`` go through ``from_dict``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from training.config_io import refuse_unknown
from training.data import DataError
from training.detection.datasets import DetectionSpec
from training.detection.model import DetectorConfigError, DetectorSpec
from training.detection.transforms import AugmentSpec
from training.plan import PLAN_MODES

# Issue-27 options at their "off" values: left out of config_hash (runs made before them still resume).
LEVERS_OFF: dict[str, Any] = {
    "ema": None,
    "freeze_trunk_epochs": 0,
    "plan": "off",
    "augment.copy_paste": 0.0,
    "augment.multiscale": [],
}

# DetectorSpec keys a user sets (the classes come from the data).
MODEL_KEYS = tuple(f.name for f in fields(DetectorSpec) if f.name != "classes")


def field_defaults(cls: type) -> dict[str, Any]:
    """A dataclass's field defaults (help texts read these; nothing is restated)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def detector_spec(classes: Any, model: Mapping[str, Any]) -> DetectorSpec:
    """``DetectorSpec`` for the data's classes with the run's model options."""
    refuse_unknown(model, MODEL_KEYS, "model", DetectorConfigError)
    return DetectorSpec(classes=tuple(classes), **dict(model))


@dataclass(frozen=True)
class DetTrainConfig:
    data: DetectionSpec
    model: Mapping[str, Any] = field(default_factory=dict)  # DetectorSpec options (MODEL_KEYS); unset = its default
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    epochs: int = 12
    batch_size: int = 4
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, torchvision's detection recipe) | "adamw"
    lr: float = 0.01  # SGD at batch 4; AdamW wants ~1e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5  # linear warm-up, then cosine to 0 (training.schedule.warmup_cosine)
    grad_clip: float | None = 10.0  # detection losses spike early (RPN regression on random anchors)
    max_steps_per_epoch: int | None = None
    patience: int | None = None  # epochs without val mAP@.5 gain before stopping; None = run all
    score_threshold: float = 0.5  # part-level verdict: a part is defective when a box scores >= this
    panels: int = 4  # predicted-vs-truth PNG panels written from the evaluated split
    amp: bool = False
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    out: str = "runs/detector"
    # Levers, off until bench/bench_defaults.py has measured them on both benchmarks (issue 27):
    ema: float | None = None  # weight EMA decay (e.g. 0.999); evaluation and best.safetensors use the average
    freeze_trunk_epochs: int = 0  # gradual unfreezing: trunk frozen this many epochs, then one stage per epoch
    plan: str = "off"  # "auto": settings the user left unset are planned from the training data (training.plan)
    pinned: tuple[str, ...] = ()  # run keys the user set (the planner keeps them); the CLI fills it

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "pinned", tuple(self.pinned))
        if self.plan not in PLAN_MODES:
            raise DataError(f"plan: expected one of {PLAN_MODES}, got {self.plan!r}")
        detector_spec(("probe",), self.model)  # validates the model options now, with their key names
        for key in ("epochs", "batch_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise DataError(f"{key}: expected a positive integer, got {v!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise DataError(f"optimizer: expected 'sgd' or 'adamw', got {self.optimizer!r}")
        for key in ("lr", "weight_decay", "warmup_epochs"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or v < 0 or (key == "lr" and v == 0):
                raise DataError(f"{key}: expected a number {'> 0' if key == 'lr' else '>= 0'}, got {v!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise DataError(f"score_threshold: expected a score in [0, 1], got {self.score_threshold!r}")
        from training.ema import check_decay

        try:
            check_decay(self.ema)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        if not isinstance(self.freeze_trunk_epochs, int) or self.freeze_trunk_epochs < 0:
            raise DataError(f"freeze_trunk_epochs: expected an integer >= 0, got {self.freeze_trunk_epochs!r}")
        for key in ("max_steps_per_epoch", "patience"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise DataError(f"{key}: expected a positive integer or null, got {v!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> DetTrainConfig:
        d = {k: v for k, v in d.items() if k not in ("task", "config_hash")}
        refuse_unknown(d, (f.name for f in fields(cls)), where, DataError)
        if "data" not in d:
            raise DataError(f"{where}: 'data' is required (the detection dataset)")
        d = dict(d)
        d["data"] = DetectionSpec.from_dict(d["data"], where=f"{where}: data")
        d["augment"] = AugmentSpec.from_dict(d.get("augment", {}))
        try:
            return cls(**d)
        except TypeError as exc:
            raise DataError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"], d["augment"], d["model"] = self.data.to_dict(), self.augment.to_dict(), dict(self.model)
        d["pinned"] = list(self.pinned)
        return {"task": "detection", **d}

    def with_(self, **kw: Any) -> DetTrainConfig:
        return replace(self, **kw)

    def hash(self) -> str:
        from training.config_io import drop_when_off

        d = drop_when_off(self.to_dict(), LEVERS_OFF)
        for k in ("out", "threads", "device", "pinned"):  # where and how fast, not what
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = ["MODEL_KEYS", "DetTrainConfig", "detector_spec", "field_defaults"]
