"""TrainConfig: typed, validated, saved as ``config.json`` beside the run's outputs.

Sources, later wins: defaults < TOML/JSON file (``--config``) < command-line flags.
File layout: top-level keys are TrainConfig fields; ``[data]`` holds DataSpec keys and
``[augment]`` AugmentConfig keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from training.classification.data import DataError, DataSpec
from training.config_io import ConfigError, read_config_file, refuse_unknown

STRATEGIES = ("two-phase", "linear-probe", "partial", "full", "gradual")
BALANCE = ("loss", "sampler", "none")
MONITORS = ("auto", "macro_f1", "auroc", "accuracy", "balanced_accuracy", "loss")
BN_MODES = ("auto", "frozen", "adapt", "train")
AUTO_POLICIES = ("none", "trivial", "rand")
# Issue-27 options at their "off" values: left out of config_hash (runs made before them still resume).
LEVERS_OFF: dict[str, Any] = {
    "plan": "off",
    "ema": None,
    "augment.policy": "none",
    "augment.mixup": 0.0,
    "augment.cutmix": 0.0,
}


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (torchvision.transforms.v2), mild by default for inspection images."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True  # random multiples of 90 degrees (square inputs)
    crop_scale: float = 0.85  # RandomResizedCrop min area fraction; 1.0 = no random crop
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.0  # colour jitter only helps RGB data
    blur_prob: float = 0.0  # chance of a light Gaussian blur (focus drift)
    # Levers, off until measured (issue 27): an automatic policy ("trivial" = TrivialAugmentWide, "rand" =
    # RandAugment) and batch mixing (Beta(alpha) of MixUp / CutMix; both > 0: one of the two per batch)
    policy: str = "none"
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in AUTO_POLICIES:
            raise ConfigError(f"augment.policy: expected one of {AUTO_POLICIES}, got {self.policy!r}")
        for k in ("mixup", "cutmix"):
            if not isinstance(getattr(self, k), float | int) or getattr(self, k) < 0:
                raise ConfigError(f"augment.{k}: expected a Beta alpha >= 0, got {getattr(self, k)!r}")
        if not 0.05 <= self.crop_scale <= 1.0:
            raise ConfigError(f"augment.crop_scale: expected a number in [0.05, 1], got {self.crop_scale}")
        for k in ("brightness", "contrast", "saturation", "blur_prob"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"augment.{k}: expected a number in [0, 1], got {v}")

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(False, False, False, 1.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class OptimConfig:
    """How a fine-tuning run optimises: shared by ``TrainConfig`` (its defaults) and ``ExtendConfig``."""

    epochs: int | None = None  # None: per strategy (TrainConfig.resolved)
    batch_size: int = 32
    lr: float = 3e-4  # head LR while fine-tuning; lower groups get lr * lr_decay**k
    lr_decay: float = 0.75  # discriminative per-group factor (1.0 = one LR for all)
    weight_decay: float = 0.01  # AdamW; not applied to norms and biases
    warmup_epochs: float = 0.5  # linear warm-up length, then cosine to 0 (per step)
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0  # max global grad norm
    balance: str = "loss"  # class imbalance: weighted "loss", weighted "sampler", "none"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache_images: bool = True  # keep decoded, resized uint8 images in RAM
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None = $DEFECTSCOPE_THREADS or torch default
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # CUDA only
    channels_last: bool = True  # NHWC memory format (CUDA and CPU)
    max_steps_per_epoch: int | None = None  # smoke runs

    def __post_init__(self) -> None:
        check_optim(self)


def check_optim(c: Any) -> None:
    """Validate the ``OptimConfig`` fields of ``c`` (an OptimConfig or a TrainConfig)."""
    if c.balance not in BALANCE:
        raise ConfigError(f"balance: expected one of {BALANCE}, got {c.balance!r}")
    for k in ("batch_size", "lr"):
        if not getattr(c, k) > 0:
            raise ConfigError(f"{k}: expected > 0, got {getattr(c, k)}")
    for k in ("epochs", "max_steps_per_epoch", "threads"):
        v = getattr(c, k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and k != "epochs")):
            raise ConfigError(f"{k}: expected a non-negative integer, got {v!r}")
    if not 0.0 < c.lr_decay <= 1.0:
        raise ConfigError(f"lr_decay: expected a number in (0, 1], got {c.lr_decay}")
    if c.weight_decay < 0 or c.warmup_epochs < 0:
        raise ConfigError(f"weight_decay/warmup_epochs: expected numbers >= 0, got {(c.weight_decay, c.warmup_epochs)}")
    if not 0.0 <= c.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing: expected a number in [0, 1), got {c.label_smoothing}")
    if c.device not in ("auto", "cpu", "cuda") and not c.device.startswith("cuda:"):
        raise ConfigError(f"device: expected auto, cpu or cuda[:N], got {c.device!r}")


OPTIM = OptimConfig()
# Per-strategy defaults that TrainConfig.resolved() fills in (and the help texts quote).
FINETUNE_EPOCHS = 10
LINEAR_PROBE_EPOCHS = 60
TWO_PHASE_HEAD_EPOCHS = 3
PARTIAL_GROUPS = 3
OPTIM_FIELDS = tuple(f.name for f in fields(OptimConfig))


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/latest"
    data: DataSpec = field(default_factory=DataSpec)
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"  # "imagenet" | "none" | path to a weights file
    image_size: int | None = None  # None: backbone default (224 for efficientnet_lite0)
    crop_fraction: float = 1.0  # crop / resize; 1.0 keeps the whole image (defects at edges)
    # Resize of training, evaluation and stations alike (runtime.inference.preprocess.INTERPOLATIONS); None: backbone's
    interpolation: str | None = None
    strategy: str = "two-phase"
    epochs: int | None = None  # fine-tuning epochs (linear-probe: head epochs); None = per strategy
    head_epochs: int | None = None  # head warm-up on cached features; None = 3 for two-phase else 0
    unfreeze_groups: int | None = None  # partial: last N groups incl. head (default 3); others: all
    gradual_every: int = 1  # gradual: one more group every K epochs
    batch_size: int = OPTIM.batch_size
    lr: float = OPTIM.lr
    head_lr: float = 3e-3  # LR for head-only training on cached features
    lr_decay: float = OPTIM.lr_decay
    weight_decay: float = OPTIM.weight_decay
    warmup_epochs: float = OPTIM.warmup_epochs
    label_smoothing: float = OPTIM.label_smoothing
    grad_clip: float | None = OPTIM.grad_clip
    balance: str = OPTIM.balance
    patience: int = 4  # early stopping: epochs without improvement
    monitor: str = "auto"  # auto = auroc (binary) / macro_f1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache_images: bool = OPTIM.cache_images
    seed: int = OPTIM.seed
    threads: int | None = OPTIM.threads
    workers: int = 0  # DataLoader workers (0 suits 2-core machines)
    device: str = OPTIM.device
    amp: bool = OPTIM.amp
    channels_last: bool = OPTIM.channels_last
    max_steps_per_epoch: int | None = OPTIM.max_steps_per_epoch
    dropout: float | None = None  # head dropout; None = backbone default
    # BatchNorm statistics while fine-tuning: "frozen" keeps the pretrained running statistics
    # (batch statistics of small, out-of-domain batches such as EL images differ so much from
    # ImageNet's that a head warmed up on frozen features collapses to chance, measured on ELPV);
    # "train" uses batch statistics; "adapt" re-estimates the running statistics once on the
    # training images and then keeps them frozen (AdaBN; on ELPV it measured worse than the
    # pretrained statistics); "auto" = frozen with pretrained weights, train from scratch.
    bn: str = "auto"
    # "auto": image_size and epochs left unset (None) are planned from the training images (training.plan)
    plan: str = "off"
    ema: float | None = None  # weight EMA decay (lever, off until measured): evaluation and best weights averaged

    def __post_init__(self) -> None:
        from training.backbones import REGISTRY
        from training.ema import check_decay
        from training.plan import PLAN_MODES

        try:
            check_decay(self.ema)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

        if self.plan not in PLAN_MODES:
            raise ConfigError(f"plan: expected one of {PLAN_MODES}, got {self.plan!r}")

        if self.backbone not in REGISTRY:
            raise ConfigError(f"backbone: unknown {self.backbone!r}; available: {', '.join(sorted(REGISTRY))}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        check_optim(self)
        if self.bn not in BN_MODES:
            raise ConfigError(f"bn: expected one of {BN_MODES}, got {self.bn!r}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"monitor: expected one of {MONITORS}, got {self.monitor!r}")
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise ConfigError(f"weights: {self.weights!r} is neither 'imagenet', 'none' nor an existing file")
        positive = {"head_lr": self.head_lr, "gradual_every": self.gradual_every}
        for k, v in positive.items():
            if not v > 0:
                raise ConfigError(f"{k}: expected > 0, got {v}")
        for k in ("head_epochs", "image_size", "unfreeze_groups"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 0 or (v == 0 and k not in ("head_epochs", "epochs"))):
                raise ConfigError(f"{k}: expected a non-negative integer, got {v!r}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ConfigError(f"crop_fraction: expected a number in (0, 1], got {self.crop_fraction}")
        from runtime.inference.preprocess import INTERPOLATIONS

        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation: expected one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")

    # -- resolved defaults -------------------------------------------------------------
    def resolved(self) -> TrainConfig:
        """Fill the per-strategy defaults so config.json records what actually ran."""
        per_strategy = LINEAR_PROBE_EPOCHS if self.strategy == "linear-probe" else FINETUNE_EPOCHS
        epochs = self.epochs if self.epochs is not None else per_strategy
        head = self.head_epochs
        if head is None:
            head = TWO_PHASE_HEAD_EPOCHS if self.strategy == "two-phase" else 0
        if self.strategy == "linear-probe":
            head = 0
        unfreeze = self.unfreeze_groups
        if unfreeze is None and self.strategy == "partial":
            unfreeze = PARTIAL_GROUPS
        bn = self.bn if self.bn != "auto" else ("train" if self.weights == "none" else "frozen")
        return replace(self, epochs=epochs, head_epochs=head, unfreeze_groups=unfreeze, bn=bn)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"] = self.data.to_dict()
        return out

    def hash(self) -> str:
        """Hash of what determines the model (not where it is written nor how many threads)."""
        from training.config_io import drop_when_off

        d = drop_when_off(self.to_dict(), LEVERS_OFF)
        for k in ("out", "threads", "workers", "device"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> TrainConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a table/object")
        d = {k: v for k, v in d.items() if k != "config_hash"}  # a run's config.json carries it
        refuse_unknown(d, (f.name for f in fields(cls)), where, ConfigError)
        try:
            if "data" in d and not isinstance(d["data"], DataSpec):
                d["data"] = DataSpec.from_dict(d["data"], where=f"{where}: data")
            if "augment" in d and not isinstance(d["augment"], AugmentConfig):
                aug = d["augment"]
                if aug in (None, False, "none"):
                    d["augment"] = AugmentConfig.none()
                else:
                    refuse_unknown(aug, (f.name for f in fields(AugmentConfig)), "augment", ConfigError)
                    d["augment"] = AugmentConfig(**aug)
            return cls(**d)
        except (ConfigError, DataError) as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from a file plus overrides (``data`` / ``augment`` overrides merge key by key)."""
    data = read_config_file(path) if path else {}
    return merge(data, overrides or {}, where=str(path) if path else "config")


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any], where: str = "config") -> TrainConfig:
    d = {k: v for k, v in base.items()}
    for k, v in overrides.items():
        if k in ("data", "augment") and isinstance(v, Mapping) and isinstance(d.get(k), Mapping):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return TrainConfig.from_dict(d, where=where)
