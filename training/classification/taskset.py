"""Tasks for ``defectscope extend``: one product line's samples in the extended class space
(with a shared decoded-image cache), how a model scores on them, and the extension's report."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from runtime.inference.preprocess import InputSpec
from training.classification.config import AugmentConfig
from training.classification.data import DataError, DataSpec


class TaskSet:
    """One task's train/val/test samples, labelled in the model's class space, with a shared
    decoded-image cache (the train augmentations and the evaluation transform reuse it)."""

    def __init__(
        self,
        name: str,
        samples: Mapping[str, Sequence[Any]],
        classes: Sequence[str],
        input_spec: InputSpec,
        augment: AugmentConfig,
        *,
        cache: bool = True,
        spec: DataSpec | None = None,
        fingerprint: str = "",
        good_classes: Sequence[str] = (),
    ) -> None:
        from training.classification.transforms import train_pipeline, val_pipeline

        self.name = name
        self.classes = list(classes)
        self.samples = {k: list(samples.get(k, [])) for k in ("train", "val", "test")}
        self.spec = spec
        self.fingerprint = fingerprint
        self.good_classes = list(good_classes)
        self.cache = cache
        self._val = val_pipeline(input_spec)
        self._train = train_pipeline(input_spec, augment)
        self._ds: dict[str, Any] = {}

    @classmethod
    def from_splits(
        cls,
        name: str,
        splits: Any,
        classes: Sequence[str],
        input_spec: InputSpec,
        augment: AugmentConfig,
        *,
        spec: DataSpec | None = None,
        cache: bool = True,
    ) -> TaskSet:
        """Relabel ``training.classification.data.Splits`` into ``classes`` (by class name)."""
        from training.classification.evaluate import remap_samples

        try:
            samples = {k: remap_samples(splits.split(k), splits.classes, classes) for k in ("train", "val", "test")}
        except ValueError as exc:
            raise DataError(f"task {name!r}: {exc}") from None
        return cls(
            name,
            samples,
            classes,
            input_spec,
            augment,
            cache=cache,
            spec=spec,
            fingerprint=splits.fingerprint,
            good_classes=splits.good_classes,
        )

    def labels(self, split: str) -> list[int]:
        return [s.label for s in self.samples[split]]

    def present_classes(self, split: str = "train") -> list[int]:
        return sorted(set(self.labels(split)))

    def dataset(self, split: str, *, train: bool = False, progress: bool = False):
        """``ImageDataset`` of a split; ``train=True`` gives the augmenting view of the same cache."""
        from training.classification.loader import ImageDataset

        if split not in self._ds:
            ds = ImageDataset(self.samples[split], self._val, cache=self.cache)
            if self.cache:
                import torch

                ds.prefill(threads=max(1, torch.get_num_threads()), progress=progress)
            self._ds[split] = ds
        ds = self._ds[split]
        return ds.with_pipeline(self._train) if train else ds

    def subset(self, split: str, indices: Sequence[int], *, train: bool = False):
        from torch.utils.data import Subset

        return Subset(self.dataset(split, train=train), list(indices))

    def loader(self, split: str, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0):
        import torch
        from torch.utils.data import DataLoader

        g = torch.Generator().manual_seed(seed)
        return DataLoader(self.dataset(split), batch_size=batch_size, shuffle=shuffle, generator=g)


def concat_loader(tasks: Sequence[TaskSet], split: str, batch_size: int, seed: int):
    import torch
    from torch.utils.data import ConcatDataset, DataLoader

    ds: ConcatDataset = ConcatDataset([t.dataset(split) for t in tasks])
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- evaluation


def evaluate_task(model, task: TaskSet, split: str, classes: Sequence[str], batch_size: int = 64):
    """``(metrics, logits (N, C))`` of ``model`` on a task split; metrics in ``classes`` space.

    A model with fewer outputs than ``classes`` (before head growth) scores 0 on the
    classes it lacks.
    """
    import torch

    from training.engine import Engine, device_of
    from training.metrics import classification_metrics

    if not task.samples[split]:
        return None, None
    preds = Engine(device=device_of(model)).predict(model, task.loader(split, batch_size))
    logits, labels = preds.logits, preds.labels
    probs = torch.softmax(logits, 1)
    if probs.shape[1] < len(classes):
        probs = torch.cat([probs, probs.new_zeros(probs.shape[0], len(classes) - probs.shape[1])], 1)
    with warnings.catch_warnings():  # a task holds a subset of the classes: expected, not news
        warnings.simplefilter("ignore", UserWarning)
        m = classification_metrics(labels.numpy(), probs.numpy(), list(classes))
    keep = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "per_class", "confusion_matrix")
    return {k: m.get(k) for k in keep}, logits


def accuracy_of(m: Mapping[str, Any] | None) -> float | None:
    """The ``accuracy`` of an ``evaluate_task`` metrics dict (None: no such split)."""
    return None if m is None else m.get("accuracy")


def mean_of(vals: Sequence[float | None]) -> float | None:
    """Mean of the known values; None if none is known."""
    known = [v for v in vals if v is not None]
    return sum(known) / len(known) if known else None


def drop(before: float | None, after: float | None) -> float | None:
    """``before - after`` (forgetting), None if either is unknown."""
    return None if before is None or after is None else before - after


def accuracy(logits, labels, classes: Sequence[int] | None = None) -> float:
    """Top-1 accuracy; with ``classes``, the argmax is taken over those columns only."""
    import torch

    if labels.numel() == 0:
        return float("nan")
    if classes is not None:
        cols = torch.as_tensor(list(classes))
        pred = cols[logits[:, cols].argmax(1)]
    else:
        pred = logits.argmax(1)
    return float((pred == labels).float().mean())


def old_logit_report(before, after, old_classes: int) -> dict[str, float]:
    """How an extended model's old-class logits on old data moved (scenario b).

    ``before``/``after``: ``(N, C_old)`` / ``(N, C_new)`` logits of the same inputs.
    """
    a = after[:, :old_classes]
    diff = (a - before).abs()
    if not diff.numel():
        return {
            "old_logits_max_abs_change": 0.0,
            "old_logits_mean_abs_change": 0.0,
            "old_argmax_agreement": float("nan"),
            "predicted_as_new_class": float("nan"),
        }
    return {
        "old_logits_max_abs_change": float(diff.max()),
        "old_logits_mean_abs_change": float(diff.mean()),
        "old_argmax_agreement": float((a.argmax(1) == before.argmax(1)).float().mean()),
        "predicted_as_new_class": float((after.argmax(1) >= old_classes).float().mean()),
    }
