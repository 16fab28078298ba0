"""A detection run's PNGs: training curves, PR curves per class (IoU .5), predicted-vs-truth panels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.fsio import atomic_write


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    _plt().close(fig)
    return path


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def plot_det_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Per epoch: training loss and its parts, val mAP@.5 / mAP@[.5:.95] / part recall."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="total")
    for k in history[0].get("loss_parts", {}) if history else ():
        axes[0].plot(ep, [h["loss_parts"].get(k) for h in history], ".--", label=k.removeprefix("loss_"))
    axes[0].set_title("training loss")
    axes[0].legend(fontsize=7)
    for key, label in (("map50", "mAP@.5"), ("map", "mAP@[.5:.95]")):
        axes[1].plot(ep, [_nan(h["val"].get(key)) for h in history], "o-", label=label)
    axes[1].plot(ep, [_nan(h["val"].get("part", {}).get("recall")) for h in history], "s:", label="part recall")
    axes[1].set_title("validation")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_pr(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], ap50: Mapping[str, Any], path: str | Path, title: str = ""
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (r, p) in curves.items():
        ap = ap50.get(name)
        ax.plot(r, p, label=f"{name} (AP50 {'n/a' if ap is None else f'{ap:.3f}'})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "precision-recall at IoU 0.5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def plot_panels(
    samples: Sequence[Any],
    predictions: Sequence[tuple[Any, Any, Any]],
    classes: Sequence[str],
    path: str | Path,
    score_threshold: float,
    n: int = 4,
) -> Path | None:
    """Up to ``n`` images (defective first): truth in green, predictions >= threshold in red, original pixels."""
    from runtime.inference.preprocess import read_image

    order = sorted(range(len(samples)), key=lambda i: (samples[i].negative, i))[:n]
    if not order:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.4), squeeze=False)
    for ax, i in zip(axes[0], order):
        s, (boxes, scores, labels) = samples[i], predictions[i]
        img = read_image(s.path)
        ax.imshow(img if img.ndim == 2 else img[:, :, ::-1], cmap="gray")
        for x0, y0, x1, y1 in s.boxes:
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.2))
        for (x0, y0, x1, y1), sc, lab in zip(np.asarray(boxes).reshape(-1, 4), scores, labels):
            if sc >= score_threshold:
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.0, ls="--"))
                ax.text(x0, y0, f"{classes[int(lab)]} {sc:.2f}", color="red", fontsize=6, va="bottom")
        ax.set_title(Path(s.path).name, fontsize=7)
        ax.axis("off")
    fig.suptitle("truth (green) vs predicted (red, dashed)", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["plot_det_curves", "plot_panels", "plot_pr"]
