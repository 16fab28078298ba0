"""Classification metrics (scikit-learn) and the run's plots (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def label_metrics(
    y_true: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """From predicted labels: n, accuracy, balanced accuracy, macro-F1 (over all classes, absent
    ones count 0), per-class P/R/F1/support, confusion matrix (rows true, columns predicted)."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    y = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    labels = list(range(len(classes)))
    out: dict[str, Any] = {"n": int(len(y))}
    if len(y) == 0:
        return out
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out.update(
        accuracy=float(accuracy_score(y, pred)),
        balanced_accuracy=float(balanced_accuracy_score(y, pred))
        if len(set(y)) > 1
        else float(accuracy_score(y, pred)),
        macro_f1=float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        per_class={
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
        confusion_matrix=confusion_matrix(y, pred, labels=labels).tolist(),
    )
    return out


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str], loss: float | None = None
) -> dict[str, Any]:
    """``label_metrics`` of the argmax plus AUROC (and ``loss`` when given).

    ``probs``: ``(N, C)`` softmax outputs. AUROC is the positive-class score for two
    classes and one-vs-rest macro for more; None when a class is absent from y_true.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(classes)))
    out = label_metrics(y, probs.argmax(1) if len(probs) else np.zeros(0, np.int64), classes)
    if len(y) == 0:
        return out
    head = ("n", "accuracy", "balanced_accuracy", "macro_f1")  # the key order metrics.json has always had
    out = {**{k: out[k] for k in head}, "auroc": None, **{k: v for k, v in out.items() if k not in head}}
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
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: Path) -> None:
    from runtime.fsio import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def plot_forgetting(report: Mapping[str, Any], history: Any, path: str | Path) -> Path:
    """``defectscope extend``'s PNG: old/new accuracy before/after (bars) and the penalty's share
    of the loss per step (``history``: ``task_loss``/``penalty`` lists, ``penalty_share``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    old_names = report.get("old_tasks") or []
    labels = [
        f"old: {', '.join(old_names)}" if old_names else "old task",
        f"new: {report['new_task']}" if report.get("new_task") else "new task",
    ]
    before = [report.get("old_accuracy_before"), report.get("new_accuracy_before")]
    after = [report.get("old_accuracy_after"), report.get("new_accuracy_after")]
    xs = range(len(labels))
    for off, vals, name in ((-0.2, before, "before"), (0.2, after, "after")):
        ys = [float("nan") if v is None else v for v in vals]
        bars = ax.bar([x + off for x in xs], ys, width=0.4, label=name)
        for b, v in zip(bars, ys):
            if not math.isnan(v):
                ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    f = report.get("forgetting")
    ax.set_title(
        f"{report.get('method', '')}  forgetting = {f:.3f}"
        if isinstance(f, (int, float))
        else str(report.get("method", ""))
    )
    ax.legend(loc="lower right")
    ax = axes[1]
    if history is not None and history.task_loss:
        t = np.asarray(history.task_loss, dtype=np.float64)
        p = np.asarray(history.penalty, dtype=np.float64)
        share = p / np.clip(t + p, 1e-12, None)
        ax.plot(t, label="task loss (CE)", lw=1)
        ax.plot(p, label="EWC penalty", lw=1)
        ax2 = ax.twinx()
        ax2.plot(share, color="gray", lw=1, ls="--", label="penalty share")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("penalty / total loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"penalty share over training = {history.penalty_share:.3f}")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path


def write_final(run_dir: Path, report: dict, card: Any, history: list, monitor: str, title: str) -> None:
    """A finished run's report.json, model card, curves.png and confusion_matrix.png."""
    from runtime.fsio import atomic_write_json

    from .checkpoint import write_card

    atomic_write_json(run_dir / "report.json", report)
    write_card(run_dir, card)
    if history:
        plot_curves(history, run_dir / "curves.png", monitor)
    if report.get("confusion_matrix") is not None:
        plot_confusion(
            report["confusion_matrix"],
            report["classes"],
            run_dir / "confusion_matrix.png",
            title=f"{title} (n={report['n']})",
        )
