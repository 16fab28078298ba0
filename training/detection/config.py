"""``DetTrainConfig``: one frozen, validated configuration of a detector training run.

Every default has one definition: the detector's in ``DetectorSpec`` (training.detection.model),
the data's in ``DetectionSpec``, augmentation's in ``AugmentSpec``, the optimisation's here.
The CLI help reads them from these dataclasses (``field_defaults``), the config file and the
saved ``config.json`` go through ``from_dict``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

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


# ``--lambda auto`` (the default; training.lambda_search, rule "retain"): one short run per grid
# point from the same start, scored on old-line and new-line val mAP@.5, then the full run at the
# chosen lambda. 0 (naive) is in the grid so the rule can pick it when EWC buys nothing: on a
# 4-class two-line pair, 1e5 cost 16.5 points of new-line mAP@.5 and saved nothing (issue 31),
# while on the project's ELPV pair (docs/benchmarks.md) it forgot 0.34x naive. Grid, share and
# rule are not yet measured across pairs (bench/bench_detection_ewc.py).
DEFAULT_LAMBDA: float | str = "auto"
LAMBDA_GRID: tuple[float, ...] = (0.0, 1e3, 1e4, 1e5)
# Epochs per grid point = ceil(epochs x this); at 1/3 a 4-point grid adds ~1.3x the full run's epochs.
SEARCH_EPOCH_SHARE = 1 / 3
DEFAULT_FISHER_SAMPLES = 64
# What EWC anchors, by parameter-name prefix. backbone.* holds the trunk and the FPN. "all" adds
# the RoI heads (box head fc6/fc7, box predictor): on a new line nothing else keeps them near the
# old line; a grown predictor is anchored on its old rows only (training.ewc.EWCPenalty).
EWC_SCOPES: dict[str, tuple[str, ...]] = {"trunk": ("backbone.", "rpn."), "all": ("backbone.", "rpn.", "roi_heads.")}
DEFAULT_EWC_SCOPE = "all"  # measured: "trunk" forgot 0.46x naive at 1e5 with 4.6x the seed spread of "all"


@dataclass(frozen=True)
class DetExtendConfig:
    source: str  # the detection run to extend
    train: DetTrainConfig  # new data, optimisation, out (model options come from the source)
    lam: float | str = DEFAULT_LAMBDA  # EWC strength; 0 = naive fine-tuning; "auto" = search lambda_grid
    lambda_grid: tuple[float, ...] = LAMBDA_GRID  # candidates of "auto"
    search_epochs: int | None = None  # epochs per grid point; None = ceil(epochs x SEARCH_EPOCH_SHARE)
    lambda_rule: str = "retain"  # training.lambda_search rule ranking the grid points
    fisher_samples: int = DEFAULT_FISHER_SAMPLES  # old training images in the Fisher estimate
    replay: str | None = None  # old training images mixed in: a count ("50") or a share ("10%")
    freeze_old_rows: bool = True  # restore the box predictor's old class rows after each step
    ewc_scope: str = DEFAULT_EWC_SCOPE  # a key of EWC_SCOPES: which parameters the penalty anchors

    def __post_init__(self) -> None:
        if self.ewc_scope not in EWC_SCOPES:
            raise ValueError(f"ewc_scope: expected one of {sorted(EWC_SCOPES)}, got {self.ewc_scope!r}")
        if isinstance(self.lam, str):
            if self.lam != "auto":
                raise ValueError(f"lambda: expected a number >= 0 or 'auto', got {self.lam!r}")
        elif not np.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"lambda: expected a finite number >= 0 or 'auto', got {self.lam!r}")
        object.__setattr__(self, "lambda_grid", tuple(float(v) for v in self.lambda_grid))
        if not self.lambda_grid or any(not np.isfinite(v) or v < 0 for v in self.lambda_grid):
            raise ValueError(f"lambda_grid: expected a non-empty list of numbers >= 0, got {self.lambda_grid!r}")
        if self.search_epochs is not None and (not isinstance(self.search_epochs, int) or self.search_epochs < 1):
            raise ValueError(f"search_epochs: expected a positive integer or null, got {self.search_epochs!r}")
        from training.lambda_search import PickRule

        PickRule(self.lambda_rule)  # validates the name
        if self.fisher_samples < 1:
            raise ValueError(f"fisher_samples: expected >= 1, got {self.fisher_samples!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": "detection",
            "source": self.source,
            "train": self.train.to_dict(),
            "lam": self.lam,
            "lambda_grid": list(self.lambda_grid),
            "search_epochs": self.search_epochs,
            "lambda_rule": self.lambda_rule,
            "fisher_samples": self.fisher_samples,
            "replay": self.replay,
            "freeze_old_rows": self.freeze_old_rows,
            "ewc_scope": self.ewc_scope,
        }

    @property
    def lambdas(self) -> tuple[float, ...]:
        """The strengths trained with: the grid under "auto", else the one given."""
        return self.lambda_grid if self.lam == "auto" else (float(self.lam),)

    @property
    def epochs_per_point(self) -> int:
        """Epochs of each grid point's short run (at most the full run's)."""
        e = self.train.epochs
        return min(e, self.search_epochs or max(1, math.ceil(e * SEARCH_EPOCH_SHARE)))


__all__ = [
    "DEFAULT_EWC_SCOPE",
    "DEFAULT_FISHER_SAMPLES",
    "DEFAULT_LAMBDA",
    "EWC_SCOPES",
    "LAMBDA_GRID",
    "MODEL_KEYS",
    "SEARCH_EPOCH_SHARE",
    "DetExtendConfig",
    "DetTrainConfig",
    "detector_spec",
    "field_defaults",
]
