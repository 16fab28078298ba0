"""Experience replay: a class-balanced buffer of old training images mixed into new epochs."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.utils.data import Dataset


def replay_count(spec: str | int | float, n_old: int) -> int:
    """Buffer size from a count (``200``, ``"200"``) or a share of the old set (``"5%"``, ``0.05``)."""
    if isinstance(spec, str):
        s = spec.strip()
        try:
            if s.endswith("%"):
                spec = float(s[:-1]) / 100.0
            elif any(ch in s for ch in ".eE"):
                spec = float(s)
            else:
                spec = int(s)
        except ValueError:
            raise ValueError(f"replay size must be a count like 200 or a share like 5%, got {spec!r}") from None
    if isinstance(spec, float):
        if not 0.0 <= spec <= 1.0:
            raise ValueError(f"replay share must be in [0, 1] (or give an integer count), got {spec}")
        return 0 if spec == 0 else max(1, round(spec * n_old))
    if int(spec) < 0:
        raise ValueError(f"replay size must be >= 0, got {spec}")
    return min(int(spec), n_old)


def select_exemplars(labels: Sequence[int], size: int, *, seed: int = 0) -> list[int]:
    """Indices of ``size`` exemplars, as class-balanced as the classes allow.

    Each class gets ``size // n_classes`` (the remainder to the largest classes); a
    class with too few items gives all it has and the rest goes to the others.
    """
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    rng = random.Random(seed)
    for idx in by_class.values():
        rng.shuffle(idx)
    size = min(size, len(labels))
    quota = {c: 0 for c in by_class}
    remaining = size
    open_classes = sorted(by_class, key=lambda c: -len(by_class[c]))
    while remaining > 0 and open_classes:
        share = max(1, remaining // len(open_classes))
        for c in list(open_classes):
            take = min(share, len(by_class[c]) - quota[c], remaining)
            quota[c] += take
            remaining -= take
            if quota[c] >= len(by_class[c]):
                open_classes.remove(c)
            if remaining == 0:
                break
    return sorted(i for c, idx in by_class.items() for i in idx[: quota[c]])


def mix_replay(new: Dataset, replay: Dataset, *, share: float | None = None) -> Dataset:
    """New data plus the replay buffer, the buffer repeated to make ``share`` of an epoch.

    ``share`` None or 0 concatenates once (the buffer's natural share).
    """
    from torch.utils.data import ConcatDataset

    n_new, n_rep = len(new), len(replay)  # type: ignore[arg-type]
    if n_rep == 0:
        return new
    reps = 1
    if share:
        if not 0 < share < 1:
            raise ValueError(f"replay share must be in (0, 1), got {share}")
        reps = max(1, round(share * n_new / ((1 - share) * n_rep)))
    return ConcatDataset([new, *([replay] * reps)])


def mix_tasks(
    train_ds: Dataset,
    train_labels: Sequence[int],
    olds: Sequence,
    spec: str,
    *,
    share: float | None,
    seed: int,
    classes: Sequence[str],
) -> tuple[Dataset, list[int], dict]:
    """New training data mixed with a buffer from the old tasks' train splits.

    ``olds``: ``training.classification.extend.TaskSet``-like (``labels(split)``, ``subset(split, idx, train=)``,
    ``samples``); each old task gets its share of the buffer. Returns the mixed dataset,
    its labels (for the class-balanced loss/sampler) and a summary for the report.
    """
    from torch.utils.data import ConcatDataset

    pools = [(t, t.labels("train")) for t in olds if t.samples["train"]]
    if not pools:
        raise ValueError("--replay needs the old task's training images (give --old-data)")
    n_old = sum(len(lab) for _, lab in pools)
    size = replay_count(spec, n_old)
    parts, rep_labels = [], []
    for t, lab in pools:
        idx = select_exemplars(lab, round(size * len(lab) / n_old), seed=seed)
        parts.append(t.subset("train", idx, train=True))
        rep_labels += [lab[i] for i in idx]
    buffer: ConcatDataset = ConcatDataset(parts)
    mixed = mix_replay(train_ds, buffer, share=share)
    n_mixed, n_new = len(mixed), len(train_ds)  # type: ignore[arg-type]
    reps = (n_mixed - n_new) // max(1, len(buffer))
    counts = {classes[c]: rep_labels.count(c) for c in sorted(set(rep_labels))}
    info = {
        "size": len(buffer),
        "per_class": counts,
        "repeats_per_epoch": reps,
        "share_of_epoch": len(buffer) * reps / n_mixed,
    }
    return mixed, list(train_labels) + rep_labels * reps, info
