"""Classification metrics (scikit-learn) and the run's plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str],
                           loss: float | None = None) -> dict[str, Any]:
    """accuracy, balanced accuracy, macro-F1, per-class P/R/F1, AUROC, confusion matrix.

    ``probs``: ``(N, C)`` softmax outputs. AUROC is the positive-class score for two
    classes and one-vs-rest macro for more; None when a class is absent from y_true.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(classes)))
    pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    out: dict[str, Any] = {"n": int(len(y))}
    if len(y) == 0:
        return out
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out.update(
        accuracy=float(accuracy_score(y, pred)),
        balanced_accuracy=float(balanced_accuracy_score(y, pred)) if len(set(y)) > 1 else float(accuracy_score(y, pred)),
        macro_f1=float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        auroc=None,
        per_class={c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                   for i, c in enumerate(classes)},
        confusion_matrix=confusion_matrix(y, pred, labels=labels).tolist(),
    )
    if len(set(y)) == len(classes) and len(classes) >= 2:
        try:
            if len(classes) == 2:
                out["auroc"] = float(roc_auc_score(y, probs[:, 1]))
            else:
                pn = probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)
                out["auroc"] = float(roc_auc_score(y, pn, multi_class="ovr", average="macro", labels=labels))
        except ValueError:
            out["auroc"] = None
    if loss is not None:
        out["loss"] = float(loss)
    return out


def monitor_name(monitor: str, num_classes: int) -> str:
    if monitor == "auto":
        return "auroc" if num_classes == 2 else "macro_f1"
    return monitor


def monitor_value(metrics: dict[str, Any], name: str) -> float:
    """Higher is better (loss is negated); a missing AUROC falls back to macro-F1."""
    if name == "loss":
        return -float(metrics.get("loss", float("inf")))
    v = metrics.get(name)
    if v is None:
        v = metrics.get("macro_f1", 0.0)
    return float(v)


def plot_curves(history: list[dict[str, Any]], path: str | Path, monitor: str) -> Path:
    """Training/validation loss, the monitored metric and the learning rate per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [h.get("train_loss") for h in history], "o-", label="train")
    axes[0].plot(ep, [h.get("val", {}).get("loss") for h in history], "o-", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    for key in dict.fromkeys((monitor, "accuracy", "macro_f1")):
        vals = [h.get("val", {}).get(key) for h in history]
        if any(v is not None for v in vals):
            axes[1].plot(ep, [np.nan if v is None else v for v in vals], "o-", label=key)
    axes[1].set_title("validation")
    axes[1].legend()
    axes[2].plot(ep, [h.get("lr") for h in history], "o-")
    axes[2].set_title("head learning rate (end of epoch)")
    # Mark phase changes (head warm-up -> fine-tuning, unfreezing steps).
    for i in range(1, len(history)):
        if history[i].get("trainable") != history[i - 1].get("trainable"):
            for ax in axes:
                ax.axvline(history[i]["epoch"] - 0.5, color="grey", ls=":", lw=1)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay
    n = len(classes)
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * n, 1.8 + 0.9 * n))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: Path) -> None:
    import os
    import tempfile
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
