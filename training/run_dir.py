"""A classifier run's directory, what its epoch loop carries and what a run returns: ``config.json`` written first, a run that
exists refused unless resumed (same config hash) or overwritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.fsio import atomic_write_json

from . import checkpoint as ckpt

if TYPE_CHECKING:
    import torch

    from .classifier import Classifier
    from .schedule import EpochPlan


class RunExistsError(RuntimeError):
    pass


@dataclass
class EpochInfo:
    """Passed to ``on_epoch_end`` callbacks (tests, progress hooks)."""

    plan: EpochPlan
    model: Classifier
    optimizer: torch.optim.Optimizer
    record: dict[str, Any]


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict[str, Any]]
    best_epoch: int
    best_value: float
    monitor: str
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopState:
    """What the epoch loop carries between epochs: optimizer, schedule and the phase it serves."""

    scaler: torch.amp.GradScaler
    opt: Any = None
    sched: Any = None
    sig: tuple[str, int] | None = None
    sched_offset: int = 0


def prepare_run_dir(
    run_dir: Path, config: dict[str, Any], config_hash: str, *, resume: bool, overwrite: bool
) -> dict[str, Any] | None:
    """Check ``run_dir`` against ``resume`` / ``overwrite``, write ``config.json``; the resume state or None."""
    cfg_file = run_dir / "config.json"
    state = None
    if resume:
        state = ckpt.load_resume(run_dir)
        if state is None:
            raise RunExistsError(f"{run_dir / ckpt.LAST}: nothing to resume from")
        saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        if saved.get("config_hash") not in (None, config_hash):
            raise RunExistsError(
                f"{cfg_file}: the run was started with another configuration "
                f"(config_hash {saved.get('config_hash')} != {config_hash}); resume with the same "
                f"options (or `--config {cfg_file}`), or train into a new --out"
            )
    elif (run_dir / ckpt.LAST).exists() and not overwrite:
        raise RunExistsError(
            f"{run_dir}: holds a run already; pass --resume to continue it, --overwrite to replace it, or another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_file, {**config, "config_hash": config_hash})
    return state
