"""The epoch plan entry (what trains when), discriminative AdamW parameter groups, warm-up + cosine LR."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .backbones import Classifier


@dataclass(frozen=True)
class EpochPlan:
    """One epoch: ``phase`` "head" (head on cached features) or "finetune" (images through the
    model with the last ``n_trainable`` groups trainable, head included)."""

    epoch: int
    phase: str
    n_trainable: int
    phase_epoch: int  # epoch index within the phase

    @property
    def signature(self) -> tuple[str, int]:
        """Changes exactly when the optimizer must be rebuilt."""
        return (self.phase, self.n_trainable)


# A parameter-group rule: gets each AdamW group (``name``, ``params``, ``lr``, ``weight_decay``)
# and returns it, changed or not (e.g. another LR for the head, no decay for a group).
GroupRule = Callable[[dict], dict]


def param_groups(
    model: Classifier, n_trainable: int, lr: float, decay: float, weight_decay: float, rules: Sequence[GroupRule] = ()
) -> list[dict]:
    """AdamW groups for the last ``n_trainable`` layer groups: head ``lr``, the k-th group below
    ``lr * decay**k``; norms and biases (1-D tensors) get no weight decay; then ``rules``."""
    groups = model.groups[len(model.groups) - n_trainable :]
    out = []
    for k, g in enumerate(reversed(groups)):
        g_lr = lr * decay**k
        params = [(n, p) for n, p in model.group_parameters(g.name) if p.requires_grad]
        decayed = [p for n, p in params if p.ndim > 1]
        plain = [p for n, p in params if p.ndim <= 1]
        if decayed:
            out.append({"params": decayed, "lr": g_lr, "weight_decay": weight_decay, "name": g.name})
        if plain:
            out.append({"params": plain, "lr": g_lr, "weight_decay": 0.0, "name": f"{g.name}.no_decay"})
    for rule in rules:
        out = [rule(dict(group)) for group in out]
    return out


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per optimizer step: linear 1/w .. 1 over ``warmup_steps``, then cosine down to 0."""
    total = max(1, int(total_steps))
    warm = max(0, min(int(warmup_steps), total - 1))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return factor


def build_optimizer(
    model: Classifier,
    n_trainable: int,
    lr: float,
    decay: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    offset: int = 0,
    rules: Sequence[GroupRule] = (),
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW + per-step LambdaLR; ``offset`` continues a phase's schedule after a rebuild;
    ``rules`` edit the parameter groups (see ``GroupRule``)."""
    opt = torch.optim.AdamW(param_groups(model, n_trainable, lr, decay, weight_decay, rules), lr=lr)
    f = warmup_cosine(total_steps, warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: f(offset + i))
    return opt, sched
