"""``ExtendConfig``: what ``defectscope extend`` does, typed, validated, saved as ``config.json``.

The optimisation part is the shared ``training.classification.config.OptimConfig`` (``optim``); a file or
``config.json`` spells its keys at the top level, beside the extension's own keys.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from training.classification.config import OPTIM_FIELDS, AugmentConfig, ConfigError, OptimConfig
from training.classification.data import DataError, DataSpec
from training.config_io import refuse_unknown
from training.ewc import DEFAULT_FISHER_SAMPLES
from training.ewc_state import DEFAULT_GAMMA

# Default penalty strength for ``L = L_new + lambda * sum F (theta - theta*)^2`` with F a
# per-input mean Fisher and L_new a per-input mean cross-entropy. The Laplace
# approximation alone gives lambda = N_old / (2 N_new) (~0.5 for equal-sized lines), but
# the diagonal Fisher taken at one point underestimates how fast old-task loss grows
# away from the anchor (and vanishes for very confident models), so useful values are
# orders of magnitude larger. 100 sits in the middle of LAMBDA_GRID (on the synthetic
# two-task test of tests/training/test_ewc.py, forgetting 0.25 naive, 0.09 at lambda 10
# with no new-task cost, 0.07 at 100 costing 7 points of new-task accuracy). The value to
# quote for ELPV is the one `bench/bench_ewc.py` picks with `--lambda auto`, which
# trains with each of LAMBDA_GRID and keeps the best mean of old and new val accuracy.
DEFAULT_LAMBDA = 100.0
LAMBDA_GRID: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0)
# Online-EWC decay (training.ewc_state.DEFAULT_GAMMA): 1.0 is the exact recursive Laplace approximation (old
# lines keep their full weight); < 1 lets long-retired lines fade (Schwarz et al. used 0.9-1.0).

METHODS = ("ewc", "naive")
BN_MODES = ("frozen", "update")
KEEP = ("last", "best")
# AdamW decay pulls toward 0, away from the anchors: none while extending.
EXTEND_OPTIM = OptimConfig(epochs=5, weight_decay=0.0)


@dataclass(frozen=True)
class ExtendConfig:
    """What ``defectscope extend`` does; saved as ``config.json`` in the output run."""

    source: str  # run dir or .safetensors (model.json beside it)
    out: str
    data: DataSpec  # the new line / new classes
    old_data: tuple[DataSpec, ...] | None = None  # None: the source model card's data; () = none
    method: str = "ewc"  # "ewc" | "naive" (no penalty)
    lam: float | str = DEFAULT_LAMBDA  # penalty strength, or "auto" (grid on validation)
    lambda_grid: tuple[float, ...] = LAMBDA_GRID
    gamma: float = DEFAULT_GAMMA  # online-EWC decay of the old Fisher
    fisher: str | None = None  # Fisher file; None: <source>/fisher.safetensors
    fisher_samples: int = DEFAULT_FISHER_SAMPLES  # inputs per Fisher estimate
    fisher_draws: int = 1  # labels sampled per input
    replay: str | None = None  # "5%" of the old train split, or a count "200"
    # Buffer's share of each epoch (repeated to reach it); 0 or None: its natural share. A 5% buffer
    # seen once is ~3% of an epoch and barely anchors the old task; experience replay mixes
    # memory into every stretch of training, so the default repeats it to about a fifth.
    replay_share: float | None = 0.2
    bn: str = "frozen"  # BN running stats: "frozen" | "update"
    freeze_old_rows: bool = False  # scenario (b): keep old head rows bit-exact while training
    # Weights kept per lambda: the "last" epoch's, or the "best" epoch's by the mean of old and
    # new validation accuracy (the score --lambda auto ranks by).
    keep: str = "last"
    write_fisher: bool = True  # consolidated Fisher for the extended model
    optim: OptimConfig = EXTEND_OPTIM

    def __post_init__(self) -> None:
        def bad(key: str, expected: str, got: Any) -> ConfigError:
            return ConfigError(f"{key}: expected {expected}, got {got!r}")

        for key, allowed in (("method", METHODS), ("bn", BN_MODES), ("keep", KEEP)):
            if getattr(self, key) not in allowed:
                raise bad(key, f"one of {allowed}", getattr(self, key))
        if isinstance(self.lam, str):
            if self.lam != "auto":
                raise bad("lambda", "a number >= 0 or 'auto'", self.lam)
        elif not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise bad("lambda", "a number >= 0 or 'auto'", self.lam)
        object.__setattr__(self, "lambda_grid", tuple(float(v) for v in self.lambda_grid))
        if not self.lambda_grid or any(v < 0 or not math.isfinite(v) for v in self.lambda_grid):
            raise bad("lambda_grid", "a non-empty list of numbers >= 0", self.lambda_grid)
        if not 0.0 <= self.gamma <= 1.0:
            raise bad("gamma", "a number in [0, 1]", self.gamma)
        for key in ("fisher_samples", "fisher_draws"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(key, "a positive integer", v)
        if self.optim.epochs is None:
            raise bad("epochs", "a non-negative integer", None)
        if self.replay_share is not None and not 0.0 <= self.replay_share < 1.0:
            raise bad("replay_share", "a number in [0, 1) (0: the buffer's natural share)", self.replay_share)
        if self.replay is not None:
            from training.replay import replay_count

            try:
                replay_count(self.replay, 1000)
            except ValueError as exc:
                raise ConfigError(f"replay: {exc}") from None
        if self.method == "naive" and self.lam == "auto":
            raise ConfigError("lambda: 'auto' only applies to --method ewc")
        if self.old_data is not None:
            object.__setattr__(self, "old_data", tuple(self.old_data))

    @property
    def epochs(self) -> int:
        return int(self.optim.epochs or 0)

    @property
    def fisher_options(self) -> dict[str, Any]:
        """How the Fisher is estimated and folded: keyword arguments of ``compute_state``/``finalize_run``."""
        return {
            "n_samples": self.fisher_samples,
            "draws": self.fisher_draws,
            "seed": self.optim.seed,
            "gamma": self.gamma,
        }

    @property
    def lambdas(self) -> tuple[float, ...]:
        """The penalty strengths to train with (one unless ``lam="auto"``; naive: 0)."""
        if self.method == "naive":
            return (0.0,)
        return self.lambda_grid if self.lam == "auto" else (float(self.lam),)

    def to_dict(self) -> dict[str, Any]:
        """Flat: the optimisation keys beside the extension's (the file layout)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "optim"}
        d.update({k: getattr(self.optim, k) for k in OPTIM_FIELDS})
        d["data"] = self.data.to_dict()
        d["old_data"] = None if self.old_data is None else [s.to_dict() for s in self.old_data]
        d["augment"] = asdict(self.optim.augment)
        d["lambda_grid"] = list(self.lambda_grid)
        return d

    def hash(self) -> str:
        d = self.to_dict()
        for k in ("out", "threads", "device"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> ExtendConfig:
        """From flat keys (a file, ``config.json``, the CLI); unknown keys are an error."""
        d = {k: v for k, v in d.items() if k != "config_hash"}
        known = ({f.name for f in fields(cls)} - {"optim"}) | set(OPTIM_FIELDS) | {"lambda"}
        refuse_unknown(d, known, where, ConfigError)
        if "lambda" in d:  # the file's spelling; `lambda` is a Python keyword
            d["lam"] = d.pop("lambda")
        try:
            optim = {k: d.pop(k) for k in OPTIM_FIELDS if k in d}
            if isinstance(optim.get("augment"), Mapping):
                optim["augment"] = AugmentConfig(**optim["augment"])
            elif "augment" in optim and optim["augment"] in (None, False, "none"):
                optim["augment"] = AugmentConfig.none()
            if not isinstance(d.get("data"), DataSpec):
                d["data"] = DataSpec.from_dict(d.get("data") or {}, where=f"{where}: data")
            if d.get("old_data") is not None:
                d["old_data"] = tuple(
                    s if isinstance(s, DataSpec) else DataSpec.from_dict(s, where=f"{where}: old_data")
                    for s in d["old_data"]
                )
            return cls(**d, optim=replace(EXTEND_OPTIM, **optim))
        except (ConfigError, DataError) as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def task_name(spec: DataSpec) -> str:
    """A short name for a data spec: ``elpv:mono``, the folder or CSV name."""
    if spec.source == "elpv":
        return f"elpv:{'+'.join(spec.cell_types)}" + ("" if spec.labels == "binary" else f":{spec.labels}")
    return Path(spec.path or "data").stem if spec.source == "csv" else Path(spec.path or "data").name
