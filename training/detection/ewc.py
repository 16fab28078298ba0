"""EWC for detectors: the Fisher of the detection loss over the parameters under given name prefixes.

The state file, the anchors and the penalty are ``training.ewc``'s (``EWCState``,
``EWCPenalty``); only the estimate differs: a detector has no single softmax to sample
labels from, so this is the empirical Fisher, ``E_x [(d L_det(x, boxes) / d theta)^2]``,
one image per backward, in train mode (torchvision computes its losses only there; the
trunk's BatchNorm is frozen, so train mode changes no statistics). Which parameters are
covered is the extension's ``ewc_scope`` (``training.detection.extend.EWC_SCOPES``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.detection.loader import DetectionDataset
from training.detection.task import move_targets
from training.engine import device_of
from training.ewc_state import EWCState, TaskRecord


def protected_names(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    return [n for n, p in model.named_parameters() if p.is_floating_point() and n.startswith(tuple(prefixes))]


def detection_fisher(
    model: nn.Module, ds: DetectionDataset, n_samples: int, prefixes: Sequence[str], *, seed: int = 0
) -> tuple[dict[str, torch.Tensor], int]:
    """Empirical diagonal Fisher of the summed detection loss over ``n_samples`` images of ``ds``
    (seeded choice) for the parameters under ``prefixes``; also the number of images used."""
    if n_samples < 1:
        raise ValueError(f"fisher samples: expected >= 1, got {n_samples}")
    if len(ds) == 0:
        raise ValueError("the Fisher data (old-task training split) is empty")
    names = protected_names(model, prefixes)
    params = dict(model.named_parameters())
    requires = {n: p.requires_grad for n, p in params.items()}
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    from training import distributed as dist

    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n_samples].tolist()
    device, was = device_of(model), model.training
    # Train mode updates unfrozen BatchNorm statistics (tiny_det, frozen_bn off): put them back after.
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.train()
    try:
        for n in names:  # frozen trunk stages are protected too: they may be unfrozen later
            params[n].requires_grad_(True)
        for i in order[dist.rank() :: dist.world()]:  # distributed: each rank its share, summed below
            image, target = ds[i]
            model.zero_grad(set_to_none=True)
            losses = model([image.to(device).float()], move_targets([target], device))
            sum(losses.values()).backward()
            for n in names:
                g = params[n].grad
                if g is not None:
                    fisher[n].add_(g.detach().float().pow(2))
    finally:
        model.zero_grad(set_to_none=True)
        for n, r in requires.items():
            params[n].requires_grad_(r)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        model.train(was)
    if dist.active():
        fisher = {n: dist.all_reduce_sum(f) for n, f in fisher.items()}
    return {n: f / len(order) for n, f in fisher.items()}, len(order)


def detection_state(
    model: nn.Module,
    fisher: dict[str, torch.Tensor],
    n: int,
    backbone: str,
    classes: Sequence[str],
    task: str = "source",
) -> EWCState:
    """An ``EWCState`` anchored at the model's current parameters, over the Fisher's parameters only."""
    params = dict(model.named_parameters())
    return EWCState(
        fisher={k: v.detach().cpu().float() for k, v in fisher.items()},
        anchors={k: params[k].detach().cpu().float().clone() for k in fisher},
        backbone=backbone,
        classes=tuple(classes),
        tasks=(TaskRecord(task, n, labels="empirical", classes=tuple(classes)),),
    )


__all__ = ["detection_fisher", "detection_state", "protected_names"]
