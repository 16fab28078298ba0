"""The classifier's strategy plan: which layer groups train in each epoch (head warm-up, then
linear-probe / partial / full / gradual / two-phase fine-tuning)."""

from __future__ import annotations

from training.classification.config import TrainConfig
from training.schedule import EpochPlan


def make_plan(cfg: TrainConfig, n_groups: int) -> list[EpochPlan]:
    """The epoch-by-epoch plan of a resolved config for a model with ``n_groups`` groups."""
    cfg = cfg.resolved()
    plan: list[EpochPlan] = []
    assert cfg.epochs is not None and cfg.head_epochs is not None  # resolved() fills both
    head = cfg.epochs if cfg.strategy == "linear-probe" else cfg.head_epochs
    for e in range(head):
        plan.append(EpochPlan(len(plan), "head", 1, e))
    if cfg.strategy == "linear-probe":
        return plan
    cap = n_groups if cfg.unfreeze_groups is None else max(1, min(cfg.unfreeze_groups, n_groups))
    for e in range(cfg.epochs):
        if cfg.strategy == "gradual":
            # Head alone first unless it was warmed up already; then one more group every K epochs.
            start = 2 if head > 0 else 1
            n = min(cap, start + e // cfg.gradual_every)
        else:  # partial, full, two-phase
            n = cap if cfg.strategy != "full" else n_groups
        plan.append(EpochPlan(len(plan), "finetune", n, e))
    return plan


def phase_steps(plan: list[EpochPlan], phase: str, steps_per_epoch: int) -> int:
    return sum(1 for p in plan if p.phase == phase) * steps_per_epoch
