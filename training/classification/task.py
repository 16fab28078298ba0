"""The classifier as a task kind: its config, data, model and the engine's step and eval hooks.

``TASK`` is what ``defectscope.tasks`` registers for "classification"; ``training.detection.task``
has the same shape for the detector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.inference.preprocess import InputSpec
from training import distributed
from training.backbones import build_model as build
from training.backbones import get_spec, sized_input
from training.classification.config import TrainConfig
from training.classification.data import Splits, resolve_splits
from training.classification.extend_config import ExtendConfig
from training.classifier import Classifier
from training.engine import Engine, Predictions, StepResult, TaskKind, seed_everything, split_batch


@dataclass
class ClassificationTask:
    """Logits ``(N, C)`` against integer labels: cross-entropy loss, classification metrics."""

    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(default_factory=nn.CrossEntropyLoss)
    # MixUp / CutMix of a training batch (training.classification.transforms.batch_mix): labels become class probabilities
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def step(self, model: nn.Module, batch: Any, engine: Engine) -> StepResult:
        x, y = split_batch(batch)
        if y is None:
            raise TypeError("a training loader must yield (inputs, labels)")
        if self.mix is not None:
            x, y = self.mix(x, torch.as_tensor(y))
        x, y = engine._inputs(x), torch.as_tensor(y).to(engine.device, non_blocking=True)
        out = model(x)
        return StepResult(self.loss(out, y), len(y), self.correct(out, y))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = self.criterion
        soft = targets.is_floating_point()  # mixed labels: class probabilities
        if distributed.active() and isinstance(c, nn.CrossEntropyLoss) and c.reduction == "mean" and not soft:
            # The mean over the *global* batch: sum / (global sum of sample weights) * world, as DDP
            # averages gradients over ranks. Exact for uneven slices and class weights alike.
            s = F.cross_entropy(
                outputs.float(),
                targets,
                weight=c.weight,
                ignore_index=c.ignore_index,
                reduction="sum",
                label_smoothing=c.label_smoothing,
            )
            kept = targets[targets != c.ignore_index]
            den = c.weight[kept].sum() if c.weight is not None else torch.tensor(float(len(kept)))
            total = distributed.all_reduce_sum(den.detach().double().reshape(1).cpu())
            return s * float(distributed.world() / max(float(total), 1e-12))
        return c(outputs.float(), targets)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> int:
        if targets.is_floating_point():  # mixed labels: the dominant class
            targets = targets.argmax(1)
        return int((outputs.detach().argmax(1) == targets).sum())

    def evaluate(self, preds: Predictions, classes: Sequence[str]) -> dict[str, Any]:
        from training.metrics import classification_metrics

        return classification_metrics(preds.labels.numpy(), preds.probs(), classes, loss=preds.loss)


def load_data(cfg: TrainConfig, echo: Callable[[str], None] = print) -> Splits:
    """The config's train / val / test splits (images verified on as many threads as torch uses)."""
    splits = resolve_splits(cfg.data, threads=max(1, torch.get_num_threads()))
    if splits.skipped:
        echo(
            f"skipped {len(splits.skipped)} unreadable image(s): "
            + ", ".join(p for p, _ in splits.skipped[:5])
            + (" ..." if len(splits.skipped) > 5 else "")
        )
    return splits


def input_spec(cfg: TrainConfig) -> InputSpec:
    """The model's input (size, crop, interpolation, normalisation) for the config's backbone."""
    return sized_input(
        get_spec(cfg.backbone), cfg.image_size, crop_fraction=cfg.crop_fraction, interpolation=cfg.interpolation
    )


def build_model(cfg: TrainConfig, classes: Sequence[str]) -> Classifier:
    """The config's backbone with a ``len(classes)`` head; the head's random init is seeded by
    ``cfg.seed`` alone (not by what the data listing drew)."""
    inp = input_spec(cfg)
    seed_everything(cfg.seed)
    return build(cfg.backbone, len(classes), cfg.weights, input_spec=inp, dropout=cfg.dropout)


TASK = TaskKind(
    name="classification",
    config=TrainConfig,
    extend_config=ExtendConfig,
    load_data=load_data,
    build_model=build_model,
    hooks=ClassificationTask,
    commands={
        "train": "training.classification.cli:train_main",
        "evaluate": "training.classification.evaluate_cli:evaluate_main",
        "extend": "training.classification.extend_cli:main",
    },
)

__all__ = ["TASK", "ClassificationTask", "build_model", "input_spec", "load_data"]
