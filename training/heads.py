"""Classifier head growth for new classes: a Linear whose old rows stay bit-exact, and the
after-step hook that keeps them so while training (``training.engine.Engine.after_step``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class GrownLinear(nn.Linear):
    """An ``nn.Linear`` whose first ``old_rows`` outputs are computed exactly as before growth.

    One GEMM over all rows can round the old logits differently (BLAS blocking depends
    on the output width; ~1e-7 relative), so the old and new rows are two products
    concatenated: old-class logits stay bit-identical to the pre-growth model. Its
    ``state_dict`` is a plain Linear's (``weight``, ``bias``), so checkpoints load into
    ``nn.Linear`` unchanged (where old logits then agree to float32 rounding).
    """

    def __init__(self, in_features: int, out_features: int, old_rows: int, bias: bool = True, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.old_rows = int(old_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.old_rows
        b = self.bias
        old = nn.functional.linear(x, self.weight[:r], None if b is None else b[:r])
        new = nn.functional.linear(x, self.weight[r:], None if b is None else b[r:])
        return torch.cat([old, new], dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, old_rows={self.old_rows}"


@torch.no_grad()
def grow_linear(old: nn.Linear, num_classes: int, *, seed: int = 0) -> nn.Linear:
    """A :class:`GrownLinear` with ``num_classes`` outputs; ``old``'s rows copied bit-exact.

    New weight rows are drawn from N(0, std of the old rows) and new biases set to the mean
    old bias, so new classes start on the old logit scale without dominating. Same width:
    ``old`` itself.
    """
    c_old = old.out_features
    if num_classes < c_old:
        raise ValueError(f"cannot shrink the head from {c_old} to {num_classes} classes")
    if num_classes == c_old:
        return old
    if isinstance(old, GrownLinear):
        raise ValueError("this head already grew in this process; save and reload the model before growing it again")
    new = GrownLinear(
        old.in_features, num_classes, c_old, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    std = float(old.weight.float().std()) if old.weight.numel() > 1 else 0.01
    new.weight[:c_old].copy_(old.weight)
    new.weight[c_old:].copy_((torch.randn((num_classes - c_old, old.in_features), generator=gen) * std).to(new.weight))
    if old.bias is not None:
        new.bias[:c_old].copy_(old.bias)
        new.bias[c_old:].fill_(float(old.bias.float().mean()))
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None and old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


class HeadRowFreeze:
    """Restores a head's first ``rows`` rows after every optimizer step (bit-exact old classes).

    Restoring (rather than zeroing gradients) also undoes weight decay and momentum.
    """

    def __init__(self, model: nn.Module, head: str, rows: int) -> None:
        mod = model.get_submodule(head)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{head!r} is {type(mod).__name__}, expected nn.Linear")
        self.mod: nn.Linear = mod
        self.rows = rows
        self.w = self.mod.weight.detach()[:rows].clone()
        self.b = None if self.mod.bias is None else self.mod.bias.detach()[:rows].clone()

    @torch.no_grad()
    def __call__(self) -> None:
        self.mod.weight[: self.rows].copy_(self.w)
        if self.b is not None:
            self.mod.bias[: self.rows].copy_(self.b)
