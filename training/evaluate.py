"""Evaluate a trained checkpoint on a data split, optionally with test-time augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .checkpoint import ModelCard
from .data import Sample
from .engine import Engine
from .loader import ImageDataset
from .metrics import classification_metrics
from .transforms import Pipeline, tta_views


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def evaluate_samples(model: torch.nn.Module, card: ModelCard, samples: Sequence[Sample], *,
                     tta: str = "none", scales: tuple[float, ...] = (0.9, 1.0, 1.1), batch_size: int = 64,
                     device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Metrics without TTA (``plain``), and with TTA (softmax averaged over views) plus the delta."""
    from torch.utils.data import DataLoader
    device = torch.device(device)
    model.to(memory_format=torch.channels_last)   # faster NHWC convolutions, CPU included
    views = tta_views(card.input, tta, scales)
    # Cache the decoded originals once; each view applies its own resize + tail.
    raw = ImageDataset(samples, Pipeline(_identity, _identity), cache=True)
    raw.prefill(threads=max(1, torch.get_num_threads()), progress=progress)
    engine = Engine(device=device, channels_last=True, progress=progress)
    y_ref, per_view, probs_sum = None, {}, None
    for name, view in views.items():
        ds = raw.with_pipeline(Pipeline(_identity, lambda x, v=view: v.tail(v.resize(x))))
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        preds = engine.predict(model, loader, desc=f"eval {name}")
        probs, loss = preds.probs(), preds.loss
        y_ref = preds.labels.numpy()
        per_view[name] = (probs, loss)
        probs_sum = probs if probs_sum is None else probs_sum + probs
    classes = list(card.classes)
    plain = classification_metrics(y_ref, per_view["identity"][0], classes, loss=per_view["identity"][1])
    out: dict[str, Any] = {"n": int(len(y_ref)), "classes": classes, "plain": plain, "tta": None}
    if len(views) > 1:
        avg = probs_sum / len(views)
        with_tta = classification_metrics(y_ref, avg, classes)
        keys = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
        out["tta"] = {
            "mode": tta, "views": list(views), "metrics": with_tta,
            "delta": {k: (None if plain.get(k) is None or with_tta.get(k) is None else with_tta[k] - plain[k])
                      for k in keys},
            "per_view": {n: {k: v for k, v in classification_metrics(y_ref, p, classes).items() if k in keys}
                         for n, (p, _) in per_view.items()},
        }
    return out


def remap_samples(samples: Sequence[Sample], data_classes: Sequence[str], model_classes: Sequence[str]) -> list[Sample]:
    """Relabel samples of a dataset to the model's class indices (by name); unknown names are an error."""
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        raise ValueError(f"data classes {unknown} are not classes of the model {list(model_classes)}")
    index = {i: list(model_classes).index(c) for i, c in enumerate(data_classes)}
    return [Sample(s.path, index[s.label], s.group) for s in samples]


def format_table(result: dict[str, Any]) -> str:
    """A plain-text summary (the CLI prints it with rich when available)."""
    lines = []
    p = result["plain"]
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines.append(f"{'metric':<20}{'plain':>10}" + (f"{'TTA':>10}{'delta':>10}" if result["tta"] else ""))
    for k in keys:
        row = f"{k:<20}{fmt(p.get(k)):>10}"
        if result["tta"]:
            row += f"{fmt(result['tta']['metrics'].get(k)):>10}{fmt(result['tta']['delta'].get(k)):>10}"
        lines.append(row)
    lines.append("")
    lines.append(f"{'class':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for c, m in p.get("per_class", {}).items():
        lines.append(f"{c:<20}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10d}")
    lines.append("")
    lines.append("confusion matrix (rows = true, columns = predicted):")
    classes = result["classes"]
    w = max(8, max(len(c) for c in classes) + 2)
    lines.append(" " * w + "".join(f"{c:>{w}}" for c in classes))
    for c, row in zip(classes, p.get("confusion_matrix", [])):
        lines.append(f"{c:<{w}}" + "".join(f"{v:>{w}d}" for v in row))
    return "\n".join(lines)


def summary_keys(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "auroc")}


