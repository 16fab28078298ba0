"""Evaluating exported models: ONNX Runtime sessions, logits, classification metrics."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def default_threads() -> int:
    """Intra-op threads: ``DEFECTSCOPE_THREADS`` if set, else all cores."""
    env = os.environ.get("DEFECTSCOPE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1


def ort_session(path: str | os.PathLike[str], threads: int | None = None, optimize: bool = True) -> Any:
    """``runtime.ort_session.ort_session`` with the workstation's thread default (``default_threads``)."""
    from runtime.inference.ort_session import ort_session as session

    return session(path, threads or default_threads(), optimize=optimize)


def predict_logits(session: Any, x: np.ndarray, batch_size: int = 32, output: str | None = None) -> np.ndarray:
    """Run ``x`` (N,C,H,W) float32 through a session in batches -> (N,K) float32 logits."""
    name = session.get_inputs()[0].name
    outs = [o.name for o in session.get_outputs()]
    out_name = output or outs[0]
    chunks = [
        session.run([out_name], {name: np.ascontiguousarray(x[i : i + batch_size])})[0]
        for i in range(0, len(x), batch_size)
    ]
    if not chunks:
        return np.empty((0, 0), np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Metrics:
    """Classification metrics of one model on one split."""

    split: str
    n: int
    accuracy: float
    macro_f1: float
    per_class_recall: Mapping[str, float] = field(default_factory=dict)
    confusion: tuple[tuple[int, ...], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n": self.n,
            "accuracy": round(self.accuracy, 6),
            "macro_f1": round(self.macro_f1, 6),
            "per_class_recall": {k: round(v, 6) for k, v in self.per_class_recall.items()},
            "confusion": [list(r) for r in self.confusion],
        }

    def value(self, metric: str) -> float:
        """A gate metric by name: accuracy, macro_f1 or recall:<class>."""
        if metric == "accuracy":
            return self.accuracy
        if metric == "macro_f1":
            return self.macro_f1
        if metric.startswith("recall:") and metric[7:] in self.per_class_recall:
            return self.per_class_recall[metric[7:]]
        raise KeyError(f"unknown metric {metric!r}; expected accuracy, macro_f1 or recall:<class>")


def prediction_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str], split: str = "test"
) -> Metrics:
    """``training.metrics.label_metrics`` (the one definition) as a gate's ``Metrics``."""
    from training.metrics import label_metrics

    if len(y_true) == 0:
        raise ValueError(f"split {split!r} is empty: nothing to evaluate")
    m = label_metrics(y_true, y_pred, classes)
    return Metrics(
        split=split,
        n=m["n"],
        accuracy=m["accuracy"],
        macro_f1=m["macro_f1"],
        per_class_recall={c: v["recall"] for c, v in m["per_class"].items()},
        confusion=tuple(tuple(row) for row in m["confusion_matrix"]),
    )


def evaluate_onnx(
    path: str | os.PathLike[str],
    x: np.ndarray,
    y: Sequence[int],
    classes: Sequence[str],
    split: str = "test",
    threads: int | None = None,
    batch_size: int = 32,
) -> tuple[Metrics, np.ndarray]:
    """Metrics of an ONNX classifier on preprocessed ``x`` -> (metrics, logits)."""
    logits = predict_logits(ort_session(path, threads), x, batch_size)
    return prediction_metrics(y, logits.argmax(1), classes, split), logits
