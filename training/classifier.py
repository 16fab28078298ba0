"""The model every backbone builds: ``Classifier`` = ``body`` + swappable ``head``, in ordered layer groups.

Freezing, gradual unfreezing and discriminative learning rates all work on the groups
(stem -> stages -> head) that the backbone spec lists (``training.backbones``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerGroup:
    """One freezing / learning-rate unit: submodule paths inside a :class:`Classifier`."""

    name: str
    modules: tuple[str, ...]


class Classifier(nn.Module):
    """``body`` -> pooled features ``(N, D)`` -> ``head`` -> logits ``(N, C)``.

    ``frozen`` names the layer groups whose parameters are frozen; ``train()`` keeps
    those groups in eval mode so their BatchNorm statistics (and dropout /
    drop-connect) stay fixed.
    """

    def __init__(
        self, body: nn.Module, feature_dim: int, num_classes: int, groups: list[LayerGroup], dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.groups: list[LayerGroup] = groups + [LayerGroup("head", ("head",))]
        self.frozen: frozenset[str] = frozenset()
        # True: every BatchNorm keeps its running statistics (eval mode) while training;
        # its affine weights still learn. See TrainConfig.bn.
        self.freeze_bn_stats = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,3,H,W)`` float32 normalized -> ``(N,D)`` pooled features."""
        return torch.flatten(self.body(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    # -- groups ---------------------------------------------------------------------
    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def group_modules(self, name: str) -> list[nn.Module]:
        group = next((g for g in self.groups if g.name == name), None)
        if group is None:
            raise KeyError(f"no layer group {name!r}; groups: {self.group_names}")
        return [self.get_submodule(p) for p in group.modules]

    def group_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """(qualified name, parameter) of one group, in module order."""
        out = []
        group = next(g for g in self.groups if g.name == name)
        for path in group.modules:
            for pname, p in self.get_submodule(path).named_parameters():
                out.append((f"{path}.{pname}", p))
        return out

    def set_trainable(self, n_groups: int | None) -> list[str]:
        """Train the last ``n_groups`` groups (head counts as one; None = all); freeze the rest.

        Returns the names of the trainable groups.
        """
        n = len(self.groups) if n_groups is None else max(0, min(int(n_groups), len(self.groups)))
        trainable = self.group_names[len(self.groups) - n :]
        for g in self.groups:
            on = g.name in trainable
            for path in g.modules:
                for p in self.get_submodule(path).parameters():
                    p.requires_grad_(on)
        self.frozen = frozenset(n for n in self.group_names if n not in trainable)
        self.train(self.training)
        return trainable

    def grow_head(self, num_classes: int, *, seed: int = 0) -> str:
        """Widen the head to ``num_classes`` outputs, old rows bit-exact (``training.heads``).

        Returns the dotted name of the head's Linear (for ``training.heads.HeadRowFreeze``).
        """
        from .heads import grow_linear

        last = len(self.head) - 1
        linear = self.head[last]
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"head.{last} is {type(linear).__name__}, expected nn.Linear")
        self.head[last] = grow_linear(linear, num_classes, seed=seed)
        self.num_classes = num_classes
        return f"head.{last}"

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:
            for name in self.frozen:
                for m in self.group_modules(name):
                    m.eval()
            if self.freeze_bn_stats:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self
