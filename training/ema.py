"""Weight EMA (a lever, off by default until measured): an exponential moving average of the weights,
updated after every optimizer step; evaluation and the saved best checkpoint use the averaged weights.

torch.optim.swa_utils keeps the average (``AveragedModel`` with ``get_ema_multi_avg_fn``, buffers
averaged too). ``applied()`` swaps the average into the training model for evaluation and saving and
swaps the live weights back, so callers keep one model object. Before the first update (e.g. a
classifier's head warm-up on cached features) it applies nothing. A resumed run restarts the average
from the resumed weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def check_decay(decay: float | None, key: str = "ema") -> None:
    if decay is not None and (not isinstance(decay, float | int) or not 0.0 < decay < 1.0):
        raise ValueError(f"{key}: expected a decay in (0, 1) or null, got {decay!r}")


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        check_decay(decay)
        self.model, self.decay = model, decay
        self.avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def updates(self) -> int:
        return int(self.avg.n_averaged.item())

    def update(self) -> None:
        """After an optimizer step (an ``Engine.after_step`` hook)."""
        self.avg.update_parameters(self.model)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in ``self.model`` inside the block; the live ones restored after."""
        if self.updates == 0:
            yield
            return
        live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            self.model.load_state_dict(self.avg.module.state_dict())
        try:
            yield
        finally:
            with torch.no_grad():
                self.model.load_state_dict(live)


@contextmanager
def maybe_applied(ema: WeightEMA | None) -> Iterator[None]:
    if ema is None:
        yield
    else:
        with ema.applied():
            yield


__all__ = ["WeightEMA", "check_decay", "maybe_applied"]
