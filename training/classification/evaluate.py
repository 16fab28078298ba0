"""Evaluate a trained checkpoint on a data split, optionally with test-time augmentation.

TTA views are the station's (``runtime.inference.tta``): same names, same implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from runtime.inference.preprocess import Preprocessor
from runtime.inference.tta import DEFAULT_SCALES, TTA, expand_views
from training.checkpoint import ModelCard
from training.classification.data import Sample
from training.engine import Engine
from training.metrics import classification_metrics


def _view_probs(
    model: torch.nn.Module, tta: TTA, samples: Sequence[Sample], batch_size: int, engine: Engine
) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (N, V, K), labels (N,))``: every view of every sample, views built by ``runtime.inference.tta``."""
    from tqdm import tqdm

    from runtime.inference.preprocess import read_image

    per = max(1, batch_size // tta.n_views)  # frames per forward pass
    probs, labels = [], []
    for i in tqdm(range(0, len(samples), per), desc="eval", unit="batch", leave=False, disable=not engine.progress):
        chunk = samples[i : i + per]
        x = np.concatenate([tta.expand(read_image(s.path)) for s in chunk])  # (n*V, C, H, W), views adjacent
        preds = engine.predict(model, [torch.from_numpy(x)])
        probs.append(preds.probs().reshape(len(chunk), tta.n_views, -1))
        labels += [s.label for s in chunk]
    return np.concatenate(probs), np.asarray(labels, dtype=np.int64)


def evaluate_samples(
    model: torch.nn.Module,
    card: ModelCard,
    samples: Sequence[Sample],
    *,
    tta: str | Sequence[str] = "none",
    scales: Sequence[float] = DEFAULT_SCALES,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics on the original view (``plain``) and with TTA (softmax averaged over the views)
    plus the delta. ``tta``: a ``runtime.inference.tta`` preset or view names, the station's vocabulary;
    the views are built by the station's code (``runtime.inference.tta.TTA``)."""
    import torch.nn.functional as F

    device = torch.device(device)
    model.to(memory_format=torch.channels_last)  # faster NHWC convolutions, CPU included
    views = expand_views(tta, scales)
    engine = Engine(device=device, channels_last=True, progress=progress)
    probs, y = _view_probs(model, TTA(views, Preprocessor(card.input)), list(samples), batch_size, engine)
    classes = list(card.classes)
    plain_p = probs[:, 0]
    loss = (
        float(F.nll_loss(torch.from_numpy(np.log(np.clip(plain_p, 1e-12, None))), torch.from_numpy(y)))
        if len(y)
        else None
    )
    plain = classification_metrics(y, plain_p, classes, loss=loss)
    out: dict[str, Any] = {"n": int(len(y)), "classes": classes, "plain": plain, "tta": None}
    if len(views) > 1:
        with_tta = classification_metrics(y, probs.mean(1), classes)
        keys = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
        out["tta"] = {
            "mode": tta if isinstance(tta, str) else ",".join(tta),
            "views": list(views),
            "metrics": with_tta,
            "delta": {
                k: (None if plain.get(k) is None or with_tta.get(k) is None else with_tta[k] - plain[k]) for k in keys
            },
            "per_view": {
                n: {k: v for k, v in classification_metrics(y, probs[:, i], classes).items() if k in keys}
                for i, n in enumerate(views)
            },
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
