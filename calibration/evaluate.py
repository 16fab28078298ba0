"""Evaluating exported models: ONNX Runtime sessions, logits, classification metrics."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def default_threads() -> int:
    """Intra-op threads: ``DEFECTSCOPE_THREADS`` if set, else all cores."""
    env = os.environ.get("DEFECTSCOPE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1


def ort_session(path: str | os.PathLike[str], threads: int | None = None, optimize: bool = True):
    """A CPU ONNX Runtime session (``threads`` intra-op, sequential execution)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(Path(path)), opts, providers=["CPUExecutionProvider"])


def predict_logits(session: Any, x: np.ndarray, batch_size: int = 32, output: str | None = None) -> np.ndarray:
    """Run ``x`` (N,C,H,W) float32 through a session in batches -> (N,K) float32 logits."""
    name = session.get_inputs()[0].name
    outs = [o.name for o in session.get_outputs()]
    out_name = output or outs[0]
    chunks = [session.run([out_name], {name: np.ascontiguousarray(x[i : i + batch_size])})[0]
              for i in range(0, len(x), batch_size)]
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


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str],
                           split: str = "test") -> Metrics:
    """Accuracy, macro-F1 (over all classes, absent ones count 0), per-class recall, confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    labels = list(range(len(classes)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        raise ValueError(f"split {split!r} is empty: nothing to evaluate")
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return Metrics(
        split=split,
        n=int(len(y_true)),
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        per_class_recall={c: float(r) for c, r in zip(classes, recall)},
        confusion=tuple(tuple(int(v) for v in row) for row in confusion_matrix(y_true, y_pred, labels=labels)),
    )


def evaluate_onnx(path: str | os.PathLike[str], x: np.ndarray, y: Sequence[int], classes: Sequence[str],
                  split: str = "test", threads: int | None = None, batch_size: int = 32) -> tuple[Metrics, np.ndarray]:
    """Metrics of an ONNX classifier on preprocessed ``x`` -> (metrics, logits)."""
    logits = predict_logits(ort_session(path, threads), x, batch_size)
    return classification_metrics(y, logits.argmax(1), classes, split), logits
