"""The engine's task extension point (``step -> StepResult``) and the detection task plugged into it."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.engine import Engine, StepResult


class _HalfLoss:
    """A dummy task: MSE of a linear model, halved, reporting a named part."""

    def step(self, model, batch, engine):
        x, y = batch
        loss = 0.5 * (model(x).squeeze(1) - y).pow(2).mean()
        return StepResult(loss, len(x), 0, {"half_mse": float(loss.detach())})

    def evaluate(self, preds, classes):
        return {}


def test_engine_uses_the_task_step_loss_and_collects_parts():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)
    model = nn.Linear(3, 1)
    ref = nn.Linear(3, 1)
    ref.load_state_dict(model.state_dict())
    stats = Engine(task=_HalfLoss()).run_epoch(model, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1))
    assert stats.parts["half_mse"] == stats.task_loss and stats.loss == stats.task_loss[0]
    # the same SGD step by hand on the halved loss: the engine used the task's loss, not its own
    (0.5 * (ref(x).squeeze(1) - y).pow(2).mean()).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    assert torch.allclose(model.weight, ref.weight, atol=1e-7) and torch.allclose(model.bias, ref.bias, atol=1e-7)


def test_detection_task_loss_is_the_sum_of_torchvision_losses():
    from tests.training.detection.helpers import squares_batch
    from training.detection.model import DetectorSpec, build_detector
    from training.detection.task import DetectionTask

    torch.manual_seed(0)
    model = build_detector(
        DetectorSpec(
            classes=("square", "bar"),
            backbone="tiny_det",
            weights="none",
            image_size=(64, 64),
            fpn_channels=16,
            representation_size=32,
        )
    )
    images, targets = squares_batch(np.random.default_rng(0), 2)
    model.train()
    torch.manual_seed(1)
    r = DetectionTask().step(model, (images, targets), Engine())
    assert set(r.parts) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert r.n == 2 and abs(float(r.loss.detach()) - sum(r.parts.values())) < 1e-5 and r.loss.requires_grad
