"""The one fine-tuning epoch loop, the one ``predict``, and the parts they call.

``Engine.run_epoch`` runs every training epoch of the package: the head warm-up on cached
features and the fine-tuning epochs of ``defectscope train`` (``training.classification.trainer``) and
every epoch of ``defectscope extend`` (``training.classification.extend``). It owns AMP, channels_last,
gradient clipping, the per-step schedule, the BatchNorm mode and the progress bar. What
differs between callers enters as parts:

- the task (``training.classification.task.ClassificationTask``; ``training.detection.task.DetectionTask``) supplies
  ``step(model, batch, engine) -> StepResult`` (moves the batch, runs the forward, returns
  the loss of a batch and its size) and the evaluation of predictions; the engine does not
  branch on it;
- extra loss terms (``LossTerm``: ``name`` + ``__call__(model) -> scalar``), e.g. the EWC
  penalty, added to the task loss in float32 outside autocast;
- after-step hooks (``Callable[[], None]``), e.g. restoring frozen head rows;
- the batches themselves (a loader over new data, or new data mixed with a replay buffer);
- parameter-group rules (``training.schedule.param_groups(rules=...)``).

``EpochSelector`` is the best-epoch bookkeeping (monitor value, patience) shared by both.

Under torchrun (``training.distributed``) ``run_epoch`` wraps the model in
DistributedDataParallel for the epoch, the batches are the rank's slices of global batches,
the classification loss is normalised by the global batch, and the epoch statistics are
reduced over ranks, so every rank returns the numbers one process would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .distributed import pick_device  # noqa: F401  (the engine's callers pick their device here)

Hook = Callable[[], None]


class LossTerm(Protocol):
    """An extra loss term: ``name`` (its key in the epoch statistics) and a scalar of the model."""

    name: str

    def __call__(self, model: nn.Module) -> torch.Tensor: ...


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels or None)`` of a batch given as a tensor, a pair or a mapping."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch:
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    if isinstance(batch, Mapping):
        return batch["image"], batch.get("label")
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}; expected (inputs, labels)")


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def setup_runtime(threads: int | None, seed: int) -> None:
    """Threads, denormal flushing (CPU stalls without it) and seeds."""
    n = threads or int(os.environ.get("DEFECTSCOPE_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_train_mode(model: nn.Module, bn_frozen: bool) -> None:
    """``model.train()``; with ``bn_frozen`` every BatchNorm keeps its running statistics.

    Frozen BN layers still learn their affine weight/bias; only the running mean/var
    (buffers, invisible to a parameter penalty) stay as they were.
    """
    model.train()
    if bn_frozen:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@dataclass
class StepResult:
    """What a task's ``step`` returns: the batch's task loss (scalar with grad), its sample
    count, correct predictions (0 where it means nothing) and named loss parts (floats,
    collected per step in ``EpochStats.parts``)."""

    loss: torch.Tensor
    n: int
    correct: int = 0
    parts: Mapping[str, float] = field(default_factory=dict)


class Task(Protocol):
    """The task part the engine calls for each training batch (inside autocast)."""

    def step(self, model: nn.Module, batch: Any, engine: Engine) -> StepResult: ...

    def evaluate(self, preds: Any, classes: Sequence[str]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TaskKind:
    """One task kind's training side; every kind has this shape (``training.classification.task.TASK``,
    ``training.detection.task.TASK``), and ``defectscope.tasks`` registers it with the kind's export
    and calibrate commands."""

    name: str
    config: type  # the train config (frozen dataclass: ``from_dict``, ``to_dict``, ``hash``)
    extend_config: type
    load_data: Callable[..., Any]  # (config, echo) -> splits: train / val / test and classes
    build_model: Callable[..., Any]  # (config, classes) -> the model, initialised from the config's seed
    hooks: Callable[..., Task]  # the engine's step and evaluate part
    commands: Mapping[str, str]  # train / evaluate / extend -> "module:function" taking the argv


@dataclass
class Predictions:
    """``logits (N, C)`` float32 and ``labels (N,)`` int64 (-1 where unlabelled), on the CPU;
    ``loss`` the mean cross-entropy over labelled inputs (nan without labels, or with labels
    the outputs do not cover), ``n_loss`` how many inputs it averages."""

    logits: torch.Tensor
    labels: torch.Tensor
    loss: float
    n_loss: int = 0

    def probs(self) -> np.ndarray:
        return self.logits.softmax(1).numpy()

    def gathered(self) -> Predictions:
        """Every rank's predictions concatenated in rank order (ranks predicted contiguous shards)."""
        if not distributed.active():
            return self
        parts = distributed.all_gather_objects((self.logits, self.labels, self.loss, self.n_loss))
        parts = [p for p in parts if len(p[1])] or parts[:1]  # a split smaller than the world leaves empty shards
        n = sum(p[3] for p in parts)
        loss = sum(p[2] * p[3] for p in parts if p[3]) / n if n else float("nan")
        return Predictions(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), loss, n)


@dataclass
class EpochStats:
    """One epoch: per-step task loss and extra terms, sample-weighted mean loss, accuracy."""

    task_loss: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)
    loss: float = 0.0  # sample-weighted mean of the task loss
    train_accuracy: float = 0.0
    seconds: float = 0.0
    parts: dict[str, list[float]] = field(default_factory=dict)  # the task's named loss parts per step


@dataclass
class Engine:
    """How to run an epoch: device, AMP (CUDA only), channels_last, clipping, BN mode, parts."""

    task: Task | None = None  # the step hook: required by run_epoch, not by predict
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False
    channels_last: bool = False
    grad_clip: float | None = None
    bn_frozen: bool = False
    terms: Sequence[LossTerm] = ()
    after_step: Sequence[Hook] = ()
    progress: bool = False
    find_unused: bool = False  # DDP: parameters that may get no gradient in a step
    # No bar (stderr not a terminal): a log line every ``log_every`` steps through ``log`` (training.progress)
    log: Callable[[str], None] | None = None
    log_every: int = 0

    @property
    def use_amp(self) -> bool:
        return self.amp and self.device.type == "cuda"

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def run_epoch(
        self,
        model: nn.Module,
        batches: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any | None = None,
        scaler: torch.amp.GradScaler | None = None,
        steps: int | None = None,
        desc: str = "train",
    ) -> EpochStats:
        """One pass over ``batches`` (at most ``steps``): task loss + terms, step, schedule, hooks.

        Distributed: every rank must get the same number of batches (``ShardedBatchSampler``).
        """
        from tqdm import tqdm

        if self.task is None:
            raise TypeError("Engine.run_epoch needs a task (its step hook), e.g. ClassificationTask()")
        task = self.task
        scaler = scaler if scaler is not None else self.scaler()
        set_train_mode(model, self.bn_frozen)
        # Terms and hooks see the bare model (parameter names without DDP's "module." prefix).
        net = distributed.wrap_ddp(model, self.device, self.find_unused) if distributed.active() else model
        sizes: list[int] = []
        params = [q for g in optimizer.param_groups for q in g["params"]]
        stats = EpochStats(terms={t.name: [] for t in self.terms})
        t0, total, n, correct = time.perf_counter(), 0.0, 0, 0
        bar = tqdm(batches, total=steps, desc=desc, unit="batch", leave=False, disable=not self.progress)
        from .progress import StepLog

        known = steps if steps is not None else (len(batches) if isinstance(batches, Sized) else None)
        lines = StepLog(self.log, self.log_every, known, desc) if self.log and not self.progress else None
        for i, batch in enumerate(bar):
            if steps is not None and i >= steps:
                break
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                step = task.step(net, batch, self)
            task_loss = step.loss
            loss = task_loss
            for term in self.terms:  # float32, outside autocast
                value = term(model)
                stats.terms[term.name].append(float(value.detach()))
                loss = loss + value
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if self.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, self.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            for hook in self.after_step:
                hook()
            stats.task_loss.append(task_loss.item())
            for k, v in step.parts.items():
                stats.parts.setdefault(k, []).append(float(v))
            total += stats.task_loss[-1] * step.n
            n += step.n
            sizes.append(step.n)
            correct += step.correct
            bar.set_postfix(loss=f"{total / max(1, n):.4f}")
            if lines is not None:
                lines.step(i + 1, total / max(1, n))
        bar.close()
        if distributed.active():
            total, n, correct = _reduce_stats(stats, sizes, correct)
        stats.loss, stats.train_accuracy = total / max(1, n), correct / max(1, n)
        stats.seconds = time.perf_counter() - t0
        return stats

    @torch.no_grad()
    def predict(self, model: nn.Module, batches: Iterable, desc: str = "eval") -> Predictions:
        """Logits and labels of every batch in eval mode (the model's mode is restored)."""
        from tqdm import tqdm

        was = model.training
        model.eval()
        logits, labels, loss, n = [], [], 0.0, 0
        try:
            for batch in tqdm(batches, desc=desc, leave=False, disable=not self.progress, unit="batch"):
                x, y = split_batch(batch)
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                    out = model(self._inputs(x)).float()
                if y is None:
                    y = torch.full((out.shape[0],), -1, dtype=torch.long)
                else:
                    y = torch.as_tensor(y).long()
                    if len(y) and int(y.max()) < out.shape[1]:  # a head not grown yet has no loss
                        loss += F.cross_entropy(out, y.to(out.device), reduction="sum").item()
                        n += len(y)
                logits.append(out.cpu())
                labels.append(y.cpu())
        finally:
            model.train(was)
        if not logits:
            return Predictions(
                torch.zeros((0, getattr(model, "num_classes", 0))), torch.zeros(0, dtype=torch.long), float("nan")
            )
        return Predictions(torch.cat(logits), torch.cat(labels), loss / n if n else float("nan"), n)


def _reduce_stats(stats: EpochStats, sizes: list[int], correct: int) -> tuple[float, int, int]:
    """Per-step values -> means over ranks (the global batch's loss), sizes and correct -> sums.

    One collective for all of it; every rank ran the same number of steps.
    """
    k = len(sizes)
    keys = sorted(stats.parts)
    rows = [stats.task_loss, *[stats.terms[t] for t in stats.terms], *[stats.parts[p] for p in keys]]
    packed = torch.tensor([*[v for r in rows for v in r], *sizes, float(correct)], dtype=torch.float64)
    packed = distributed.all_reduce_sum(packed)
    w = distributed.world()
    means = (packed[: len(rows) * k] / w).reshape(len(rows), k).tolist() if k else [[] for _ in rows]
    stats.task_loss = means[0]
    for i, t in enumerate(stats.terms):
        stats.terms[t] = means[1 + i]
    for i, p in enumerate(keys):
        stats.parts[p] = means[1 + len(stats.terms) + i]
    n_step = packed[len(rows) * k : len(rows) * k + k].tolist()
    total = sum(v * m for v, m in zip(stats.task_loss, n_step))
    return total, int(sum(n_step)), int(packed[-1])


@dataclass
class EpochSelector:
    """Best-epoch bookkeeping: the best monitor value, its epoch (1-based), epochs without gain."""

    best_value: float = -float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record epoch ``epoch`` (1-based) scoring ``value``; True if it is the new best."""
        if value > self.best_value:
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def exhausted(self, patience: int) -> bool:
        return self.best_epoch >= 0 and self.bad_epochs >= patience


# What an epoch-loop gate answers before each planned epoch.
TRAIN, SKIP, STOP = "train", "skip", "stop"
P = TypeVar("P")


def fit_epochs(
    plan: Iterable[P],
    step: Callable[[P], tuple[int, float, dict[str, Any]]],
    *,
    selector: EpochSelector | None = None,
    gate: Callable[[P, EpochSelector], str] | None = None,
    done: Callable[[P, dict[str, Any], bool], None] | None = None,
) -> EpochSelector:
    """The one epoch loop of every task and command (train, extend; classifier and detector).

    For each planned epoch: ``gate`` says TRAIN, SKIP or STOP (patience, phases); ``step`` trains
    (``Engine.run_epoch``) and validates, returning ``(1-based epoch, monitor value, record)``; the
    selector keeps the best epoch and counts the epochs without gain; ``done`` gets the record and
    whether the epoch is the new best (save weights, write metrics, log).
    """
    sel = selector if selector is not None else EpochSelector()
    for p in plan:
        verdict = gate(p, sel) if gate is not None else TRAIN
        if verdict == SKIP:
            continue
        if verdict == STOP:
            break
        epoch, value, record = step(p)
        improved = sel.update(epoch, value)
        if done is not None:
            done(p, record, improved)
    return sel
