"""Per-input squared gradients of ``log p(y|x)``, weighted by label: the Fisher's building block.

``label_weights`` says which labels each input is differentiated for (sampled from the
model, every class weighted by its probability, or the data's labels); ``SquaredGrads``
sums ``w * g^2`` by ``torch.func.vmap`` or a per-input backward loop.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

LabelMode = Literal["sampled", "exact", "empirical"]


@torch.no_grad()
def label_weights(
    logits: torch.Tensor, y_true: torch.Tensor | None, labels: LabelMode, draws: int, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row index, label, weight)`` triples whose weighted squared gradients sum to F * N.

    ``row index`` points into the batch, so one input can appear with several labels.
    ``uniforms`` ``(N, draws)`` in [0, 1) are the input's own draws ("sampled": label = inverse
    CDF of the softmax at u): tied to the input, not to the batch it came in, so a sharded
    estimate (each rank a part of the inputs) samples the very labels one process samples.
    """
    n, c = logits.shape
    rows = torch.arange(n)
    if labels == "sampled":
        cdf = torch.softmax(logits.double(), dim=1).cpu().cumsum(1)
        u = uniforms.double().reshape(n, draws) * cdf[:, -1:]
        ys = torch.searchsorted(cdf, u, right=True).clamp_(max=c - 1)  # (N, draws)
        return rows.repeat_interleave(draws), ys.reshape(-1), torch.full((n * draws,), 1.0 / draws)
    if labels == "exact":
        # E_{y~p(y|x)} [g_y^2] summed over every class: no sampling noise, C backward passes.
        probs = torch.softmax(logits.double(), dim=1).cpu()
        return rows.repeat_interleave(c), torch.arange(c).repeat(n), probs.reshape(-1)
    if labels == "empirical":
        if y_true is None:
            raise ValueError("labels='empirical' needs a loader that yields (inputs, labels)")
        return rows, y_true.cpu().long(), torch.ones(n)
    raise ValueError(f"labels must be 'sampled', 'exact' or 'empirical', got {labels!r}")


def _sq_grads_vmap(model, params, buffers, x, y, w):
    from torch.func import functional_call, grad, vmap

    def logp(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        # gather, not [0, yi]: indexing by a batched scalar would need .item() under vmap
        return torch.log_softmax(out, dim=1)[0].gather(0, yi.reshape(1)).squeeze(0)

    g = vmap(grad(logp), in_dims=(None, 0, 0))(params, x, y)  # {name: (n, *shape)}
    w = w.to(x.device)
    return {n: torch.tensordot(w.to(gi.dtype), gi.pow(2), dims=1) for n, gi in g.items()}


def _sq_grads_loop(model, params, x, y, w):
    named = dict(model.named_parameters())
    names = list(params)
    tensors = [named[n] for n in names]
    out = {n: torch.zeros_like(t) for n, t in zip(names, tensors)}
    for i in range(x.shape[0]):
        if float(w[i]) == 0.0:
            continue
        logp = torch.log_softmax(model(x[i : i + 1]), dim=1)[0, int(y[i])]
        grads = torch.autograd.grad(logp, tensors, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n].add_(g.pow(2), alpha=float(w[i]))
    return out


class SquaredGrads:
    """Weighted sums of squared per-input gradients, by vmap or a backward loop.

    ``method="auto"`` tries vmap off the CPU and falls back to the loop (once, with a
    warning) for models functorch refuses.
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], method: str, device: torch.device) -> None:
        self.model, self.params, self.method = model, params, method
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.use_vmap = method == "vmap" or (method == "auto" and device.type != "cpu")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.use_vmap:
            try:
                return _sq_grads_vmap(self.model, self.params, self.buffers, x, y, w)
            except Exception as exc:  # functorch refuses data-dependent Python code
                if self.method == "vmap":
                    raise
                warnings.warn(
                    f"per-sample gradients via torch.func.vmap failed for this model "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                    "using a per-input backward loop (slower, same result)",
                    stacklevel=3,
                )
                self.use_vmap = False
        with torch.enable_grad():
            return _sq_grads_loop(self.model, self.params, x, y, w)
