"""``defectscope extend``: teach a trained model a new product line or new defect classes
without forgetting the old ones (EWC, a replay buffer, or both; naive fine-tuning for comparison).

Two scenarios, chosen by the data: (a) the new line's classes are the model's classes
(a new domain); (b) the new data brings classes the model does not know: the head grows
(old rows copied bit-exact, see ``training.ewc.grow_head``) and the penalty keeps the
backbone and the old rows near their anchors while the new rows learn freely.

The Fisher diagonal and anchors of the source model come from ``fisher.safetensors``
beside its checkpoint (``--finalize`` writes it; ``extend`` computes and saves it there on
first use when the old data is at hand), so later extensions do not need the old images.
The extended run directory gets a consolidated (online-EWC) ``fisher.safetensors`` for
the next product line.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .config import AugmentConfig, ConfigError
from .data import DataError, DataSpec

METHODS = ("ewc", "naive")
BN_MODES = ("frozen", "update")
REPORT_PNG = "ewc_report.png"


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ExtendConfig:
    """What ``defectscope extend`` does; saved as ``config.json`` in the output run."""

    source: str                                   # run dir or .safetensors (model.json beside it)
    out: str
    data: DataSpec                                # the new line / new classes
    old_data: tuple[DataSpec, ...] | None = None  # None: the source model card's data; () = none
    method: str = "ewc"                           # "ewc" | "naive" (no penalty)
    lam: float | str = 100.0                      # penalty strength, or "auto" (grid on validation)
    lambda_grid: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0)
    gamma: float = 1.0                            # online-EWC decay of the old Fisher
    fisher: str | None = None                     # Fisher file; None: <source>/fisher.safetensors
    fisher_samples: int = 512                     # inputs per Fisher estimate
    fisher_draws: int = 1                         # labels sampled per input
    replay: str | None = None                     # "5%" of the old train split, or a count "200"
    # Buffer's share of each epoch (repeated to reach it); 0 or None: its natural share. A 5% buffer
    # seen once is ~3% of an epoch and barely anchors the old task; experience replay mixes
    # memory into every stretch of training, so the default repeats it to about a fifth.
    replay_share: float | None = 0.2
    bn: str = "frozen"                            # BN running stats: "frozen" | "update"
    freeze_old_rows: bool = False                 # scenario (b): keep old head rows bit-exact while training
    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-4                              # head LR; lower groups lr * lr_decay**k
    lr_decay: float = 0.75
    weight_decay: float = 0.0                     # AdamW decay pulls toward 0, away from the anchors
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    balance: str = "loss"                         # "loss" | "sampler" | "none"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    amp: bool = True                              # CUDA only
    cache_images: bool = True
    max_steps_per_epoch: int | None = None        # smoke runs
    write_fisher: bool = True                     # consolidated Fisher for the extended model

    def __post_init__(self) -> None:
        def bad(key: str, expected: str, got: Any) -> ConfigError:
            return ConfigError(f"{key}: expected {expected}, got {got!r}")

        if self.method not in METHODS:
            raise bad("method", f"one of {METHODS}", self.method)
        if self.bn not in BN_MODES:
            raise bad("bn", f"one of {BN_MODES}", self.bn)
        if self.balance not in ("loss", "sampler", "none"):
            raise bad("balance", "loss, sampler or none", self.balance)
        if isinstance(self.lam, str):
            if self.lam != "auto":
                raise bad("lambda", "a number >= 0 or 'auto'", self.lam)
        elif not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise bad("lambda", "a number >= 0 or 'auto'", self.lam)
        object.__setattr__(self, "lambda_grid", tuple(float(v) for v in self.lambda_grid))
        if not self.lambda_grid or any(v < 0 or not math.isfinite(v) for v in self.lambda_grid):
            raise bad("lambda_grid", "a non-empty list of numbers >= 0", self.lambda_grid)
        if not 0.0 <= self.gamma <= 1.0:
            raise bad("gamma", "a number in [0, 1]", self.gamma)
        for key in ("fisher_samples", "fisher_draws", "epochs", "batch_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "epochs" else 1):
                raise bad(key, "a positive integer", v)
        for key in ("lr",):
            if not getattr(self, key) > 0:
                raise bad(key, "a number > 0", getattr(self, key))
        if not 0.0 < self.lr_decay <= 1.0:
            raise bad("lr_decay", "a number in (0, 1]", self.lr_decay)
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise bad("weight_decay/warmup_epochs", "numbers >= 0", (self.weight_decay, self.warmup_epochs))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad("label_smoothing", "a number in [0, 1)", self.label_smoothing)
        if self.replay_share is not None and not 0.0 <= self.replay_share < 1.0:
            raise bad("replay_share", "a number in [0, 1) (0: the buffer's natural share)", self.replay_share)
        if self.replay is not None:
            from .ewc import replay_count

            try:
                replay_count(self.replay, 1000)
            except ValueError as exc:
                raise ConfigError(f"replay: {exc}") from None
        if self.method == "naive" and self.lam == "auto":
            raise ConfigError("lambda: 'auto' only applies to --method ewc")
        if self.old_data is not None:
            object.__setattr__(self, "old_data", tuple(self.old_data))

    @property
    def lambdas(self) -> tuple[float, ...]:
        """The penalty strengths to train with (one unless ``lam="auto"``; naive: 0)."""
        if self.method == "naive":
            return (0.0,)
        return self.lambda_grid if self.lam == "auto" else (float(self.lam),)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = self.data.to_dict()
        d["old_data"] = None if self.old_data is None else [s.to_dict() for s in self.old_data]
        d["augment"] = asdict(self.augment)
        d["lambda_grid"] = list(self.lambda_grid)
        return d

    def hash(self) -> str:
        d = self.to_dict()
        for k in ("out", "threads", "device"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> ExtendConfig:
        known = {f.name for f in fields(cls)} | {"lambda"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        d = dict(d)
        if "lambda" in d:  # the file's spelling; `lambda` is a Python keyword
            d["lam"] = d.pop("lambda")
        try:
            if not isinstance(d.get("data"), DataSpec):
                d["data"] = DataSpec.from_dict(d.get("data") or {}, where=f"{where}: data")
            if d.get("old_data") is not None:
                d["old_data"] = tuple(s if isinstance(s, DataSpec) else DataSpec.from_dict(s, where=f"{where}: old_data")
                                      for s in d["old_data"])
            if isinstance(d.get("augment"), Mapping):
                d["augment"] = AugmentConfig(**d["augment"])
            elif d.get("augment") in (None, False, "none") and "augment" in d:
                d["augment"] = AugmentConfig.none()
            return cls(**d)
        except (ConfigError, DataError) as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def task_name(spec: DataSpec) -> str:
    """A short name for a data spec: ``elpv:mono``, the folder or CSV name."""
    if spec.source == "elpv":
        return f"elpv:{'+'.join(spec.cell_types)}" + ("" if spec.labels == "binary" else f":{spec.labels}")
    return Path(spec.path or "data").stem if spec.source == "csv" else Path(spec.path or "data").name


# ----------------------------------------------------------------------------- tasks


class TaskSet:
    """One task's train/val/test samples, labelled in the model's class space, with a shared
    decoded-image cache (the train augmentations and the evaluation transform reuse it)."""

    def __init__(self, name: str, samples: Mapping[str, Sequence[Any]], classes: Sequence[str],
                 input_spec: Mapping[str, Any], augment: AugmentConfig, *, cache: bool = True,
                 spec: DataSpec | None = None, fingerprint: str = "", good_classes: Sequence[str] = ()) -> None:
        from .transforms import train_pipeline, val_pipeline

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
    def from_splits(cls, name: str, splits: Any, classes: Sequence[str], input_spec: Mapping[str, Any],
                    augment: AugmentConfig, *, spec: DataSpec | None = None, cache: bool = True) -> TaskSet:
        """Relabel ``training.data.Splits`` into ``classes`` (by class name)."""
        from .evaluate import remap_samples

        try:
            samples = {k: remap_samples(splits.split(k), splits.classes, classes) for k in ("train", "val", "test")}
        except ValueError as exc:
            raise DataError(f"task {name!r}: {exc}") from None
        return cls(name, samples, classes, input_spec, augment, cache=cache, spec=spec,
                   fingerprint=splits.fingerprint, good_classes=splits.good_classes)

    def labels(self, split: str) -> list[int]:
        return [s.label for s in self.samples[split]]

    def present_classes(self, split: str = "train") -> list[int]:
        return sorted(set(self.labels(split)))

    def dataset(self, split: str, *, train: bool = False, progress: bool = False):
        """``ImageDataset`` of a split; ``train=True`` gives the augmenting view of the same cache."""
        from .loader import ImageDataset

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


def _concat_loader(tasks: Sequence[TaskSet], split: str, batch_size: int, seed: int):
    import torch
    from torch.utils.data import ConcatDataset, DataLoader

    ds = ConcatDataset([t.dataset(split) for t in tasks])
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- evaluation


def evaluate_task(model, task: TaskSet, split: str, classes: Sequence[str], batch_size: int = 64):
    """``(metrics, logits (N, C))`` of ``model`` on a task split; metrics in ``classes`` space.

    A model with fewer outputs than ``classes`` (before head growth) scores 0 on the
    classes it lacks.
    """
    import torch

    from .ewc import predict_logits
    from .metrics import classification_metrics

    if not task.samples[split]:
        return None, None
    logits, labels = predict_logits(model, task.loader(split, batch_size))
    probs = torch.softmax(logits, 1)
    if probs.shape[1] < len(classes):
        probs = torch.cat([probs, probs.new_zeros(probs.shape[0], len(classes) - probs.shape[1])], 1)
    with warnings.catch_warnings():  # a task holds a subset of the classes: expected, not news
        warnings.simplefilter("ignore", UserWarning)
        m = classification_metrics(labels.numpy(), probs.numpy(), list(classes))
    keep = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "per_class", "confusion_matrix")
    return {k: m.get(k) for k in keep}, logits


def _acc(m: Mapping[str, Any] | None) -> float | None:
    return None if m is None else m.get("accuracy")


def _mean(vals: Sequence[float | None]) -> float | None:
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------- core


@dataclass
class Outcome:
    """What :func:`extend_model` returns: the extended model (in place) and its report."""

    model: Any
    classes: list[str]
    report: dict[str, Any]
    history: Any                       # ewc.FitHistory of the chosen lambda
    epochs: list[dict[str, Any]]       # per-epoch records of the chosen lambda
    state: Any | None = None           # consolidated EWCState for the extended model


def _train_once(model, train_ds, train_labels, *, lam: float, state, cfg: ExtendConfig, device, classes,
                new: TaskSet, olds: Sequence[TaskSet], head_freeze, progress: bool, echo: Callable[[str], None]):
    import numpy as np
    import torch

    from . import ewc
    from .loader import class_weights, make_loader
    from .schedule import build_optimizer

    nc = len(classes)
    labels = np.asarray(train_labels, dtype=np.int64)
    loader = make_loader(train_ds, labels, nc, cfg.batch_size, train=True, balance=cfg.balance, seed=cfg.seed,
                         pin_memory=device.type == "cuda")
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    if hasattr(model, "set_trainable"):
        model.set_trainable(None)
        opt, sched = build_optimizer(model, len(model.groups), cfg.lr, cfg.lr_decay, cfg.weight_decay,
                                     total_steps=max(1, steps * cfg.epochs),
                                     warmup_steps=int(round(cfg.warmup_epochs * steps)))
    else:  # any nn.Module (tests, other callers): one AdamW group, constant LR
        opt, sched = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay), None
    cw = class_weights(labels, nc).to(device) if cfg.balance == "loss" else None
    criterion = torch.nn.CrossEntropyLoss(weight=cw, label_smoothing=cfg.label_smoothing)
    penalty = ewc.EWCPenalty(state, model, lam) if (lam > 0 and state is not None) else None
    records: list[dict[str, Any]] = []

    def on_epoch_end(epoch: int, summary: dict[str, float]) -> None:
        rec = dict(summary, lam=lam)
        nv, _ = evaluate_task(model, new, "val", classes)
        rec["new_val_accuracy"] = _acc(nv)
        ov = [_acc(evaluate_task(model, t, "val", classes)[0]) for t in olds]
        rec["old_val_accuracy"] = _mean(ov)
        records.append(rec)
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        echo(f"  [lambda {lam:g}] epoch {epoch + 1}/{cfg.epochs}: CE {summary['task_loss']:.4f} "
             f"penalty {summary['penalty']:.4f}  val new {fmt(rec['new_val_accuracy'])} "
             f"old {fmt(rec['old_val_accuracy'])}  ({summary['seconds']:.1f}s)")

    hist = ewc.fit(model, loader, epochs=cfg.epochs, optimizer=opt, scheduler=sched, penalty=penalty, bn=cfg.bn,
                   after_step=head_freeze, on_epoch_end=on_epoch_end, criterion=criterion,
                   grad_clip=cfg.grad_clip, max_steps_per_epoch=cfg.max_steps_per_epoch, amp=cfg.amp,
                   progress=progress)
    return hist, records


def extend_model(model, old_classes: Sequence[str], new: TaskSet, olds: Sequence[TaskSet], state,
                 cfg: ExtendConfig, *, backbone: str, device=None, progress: bool = False,
                 echo: Callable[[str], None] = print) -> Outcome:
    """Fine-tune ``model`` (in place) on ``new`` with the configured method; no disk I/O.

    ``new``/``olds`` are labelled in the extended class list ``new.classes`` (the old
    classes first). ``state`` is the source model's :class:`training.ewc.EWCState`
    (required for ``method="ewc"``; used to fold the new Fisher into for online EWC).
    """
    import torch

    from . import ewc
    from .trainer import seed_everything

    t_start = time.perf_counter()
    device = device or ewc._device_of(model)
    classes = list(new.classes)
    old_classes = list(old_classes)
    if classes[: len(old_classes)] != old_classes:
        raise ValueError(f"extended classes {classes} must start with the model's classes {old_classes}")
    if cfg.method == "ewc" and state is None:
        raise ewc.EWCError("method 'ewc' needs the source model's Fisher/anchor state")
    if cfg.lam == "auto" and not any(t.samples["val"] for t in olds):
        raise DataError("--lambda auto scores candidates on old-task validation data; none is available "
                        "(give --old-data, or a fixed --lambda)")
    grown = len(classes) > len(old_classes)

    # -- before
    t0 = time.perf_counter()
    new_before, _ = evaluate_task(model, new, "test", classes)
    old_before, old_logits_before = {}, {}
    for t in olds:
        old_before[t.name], old_logits_before[t.name] = evaluate_task(model, t, "test", classes)
    eval_s = time.perf_counter() - t0

    # -- grow
    growth: dict[str, Any] | None = None
    head_freeze = None
    if grown:
        head = ewc.grow_head(model, len(classes), seed=cfg.seed)
        growth = {"head": head, "old_classes": len(old_classes), "new_classes": classes[len(old_classes):]}
        for t in olds:
            if old_logits_before[t.name] is not None:
                _, after = evaluate_task(model, t, "test", classes)
                growth[f"old_logits_max_abs_change_at_growth[{t.name}]"] = float(
                    (after[:, : len(old_classes)] - old_logits_before[t.name]).abs().max())
        if cfg.freeze_old_rows:
            head_freeze = ewc.HeadRowFreeze(model, head, len(old_classes))
        echo(f"head grown {len(old_classes)} -> {len(classes)} classes: + {growth['new_classes']}")

    # -- training data (+ replay)
    train_ds = new.dataset("train", train=True, progress=progress)
    train_labels = new.labels("train")
    replay_info = None
    if cfg.replay:
        from torch.utils.data import ConcatDataset

        from .ewc import mix_replay, replay_count, select_exemplars

        pools = [(t, t.labels("train")) for t in olds if t.samples["train"]]
        if not pools:
            raise DataError("--replay needs the old task's training images (give --old-data)")
        n_old = sum(len(lab) for _, lab in pools)
        size = replay_count(cfg.replay, n_old)
        parts, rep_labels = [], []
        for t, lab in pools:  # each old task gets its share of the buffer
            k = round(size * len(lab) / n_old)
            idx = select_exemplars(lab, k, seed=cfg.seed)
            parts.append(t.subset("train", idx, train=True))
            rep_labels += [lab[i] for i in idx]
        buffer = ConcatDataset(parts)
        mixed = mix_replay(train_ds, buffer, share=cfg.replay_share)
        reps = (len(mixed) - len(train_ds)) // max(1, len(buffer))
        train_ds = mixed
        train_labels = list(train_labels) + rep_labels * reps
        counts = {classes[c]: rep_labels.count(c) for c in sorted(set(rep_labels))}
        replay_info = {"size": len(buffer), "per_class": counts, "repeats_per_epoch": reps,
                       "share_of_epoch": len(buffer) * reps / len(train_ds)}
        echo(f"replay buffer: {len(buffer)} old exemplars {counts}, x{reps} per epoch")

    # -- train (one lambda, or the grid for --lambda auto)
    start = copy.deepcopy(model.state_dict())
    runs, best = [], None
    for lam in cfg.lambdas:
        model.load_state_dict(start)
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        hist, records = _train_once(model, train_ds, train_labels, lam=lam, state=state, cfg=cfg, device=device,
                                    classes=classes, new=new, olds=olds, head_freeze=head_freeze,
                                    progress=progress, echo=echo)
        last = records[-1] if records else {}
        score = _mean([last.get("old_val_accuracy"), last.get("new_val_accuracy")])
        runs.append({"lambda": lam, "new_val_accuracy": last.get("new_val_accuracy"),
                     "old_val_accuracy": last.get("old_val_accuracy"), "score": score,
                     "penalty_share": hist.penalty_share, "train_s": time.perf_counter() - t0})
        if best is None or (score is not None and (best[0] is None or score > best[0])):
            best = (score, lam, copy.deepcopy(model.state_dict()) if len(cfg.lambdas) > 1 else None, hist, records)
    score, lam, best_sd, hist, records = best
    if best_sd is not None:
        model.load_state_dict(best_sd)
    if len(cfg.lambdas) > 1:
        echo(f"lambda auto: picked {lam:g} (mean of old/new val accuracy {score:.4f}) from {list(cfg.lambdas)}")
    train_s = sum(r["train_s"] for r in runs)

    # -- after
    t0 = time.perf_counter()
    new_after, _ = evaluate_task(model, new, "test", classes)
    old_after, old_logits = {}, {}
    for t in olds:
        old_after[t.name], logits = evaluate_task(model, t, "test", classes)
        if grown and logits is not None:
            old_logits[t.name] = ewc.old_logit_report(old_logits_before[t.name], logits, len(old_classes))
            old_logits[t.name]["old_accuracy_within_old_classes"] = ewc.accuracy(
                logits, torch.tensor(t.labels("test")), range(len(old_classes)))
    eval_s += time.perf_counter() - t0

    # -- online EWC: fold this task's Fisher into the state for the next extension
    new_state, fisher_s = None, 0.0
    if cfg.write_fisher:
        t0 = time.perf_counter()
        f_new = ewc.estimate_fisher(model, new.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed),
                                    n_samples=min(cfg.fisher_samples, len(new.samples["train"])),
                                    draws=cfg.fisher_draws, seed=cfg.seed, progress=progress)
        record = ewc.TaskRecord(new.name, min(cfg.fisher_samples, len(new.samples["train"])), "sampled",
                                cfg.fisher_draws, tuple(new.classes[c] for c in new.present_classes()))
        new_state = ewc.consolidate(state, model, f_new, task=record, backbone=backbone, classes=classes,
                                    gamma=cfg.gamma)
        fisher_s = time.perf_counter() - t0

    ob, oa = _mean([_acc(m) for m in old_before.values()]), _mean([_acc(m) for m in old_after.values()])
    report = {
        "method": cfg.method + ("+replay" if cfg.replay else ""),
        "lambda": lam if cfg.method == "ewc" else 0.0,
        "lambda_mode": "auto" if cfg.lam == "auto" else "fixed",
        "lambda_search": runs if len(runs) > 1 else None,
        "bn": cfg.bn,
        "classes": classes,
        "scenario": "new-classes" if grown else "new-domain",
        "new_task": new.name,
        "old_tasks": [t.name for t in olds],
        "new_accuracy_before": _acc(new_before),
        "new_accuracy_after": _acc(new_after),
        "old_accuracy_before": ob,
        "old_accuracy_after": oa,
        "forgetting": None if ob is None or oa is None else ob - oa,
        "penalty_share": hist.penalty_share,
        "new": {"before": new_before, "after": new_after},
        "old": {t.name: {"before": old_before[t.name], "after": old_after[t.name],
                         "forgetting": (None if old_before[t.name] is None else
                                        _acc(old_before[t.name]) - _acc(old_after[t.name]))} for t in olds},
        "head_growth": growth,
        "old_class_logits": old_logits or None,
        "replay": replay_info,
        "fisher": None if state is None else {"tasks": [asdict(t) for t in state.tasks],
                                              "anchor_sha256": state.anchor_sha256, "gamma": state.gamma},
        "timing_s": {"total": time.perf_counter() - t_start, "train": train_s, "eval": eval_s, "fisher": fisher_s},
    }
    return Outcome(model, classes, report, hist, records, new_state)


# ----------------------------------------------------------------------------- I/O


def fisher_path(source: str | Path) -> Path:
    """Where a checkpoint's ``fisher.safetensors`` lives (beside its weights)."""
    from .ewc import FISHER_FILE

    p = Path(source)
    return (p if p.is_dir() else p.parent) / FISHER_FILE


def compute_state(model, card, tasks: Sequence[TaskSet], *, n_samples: int, draws: int = 1, seed: int = 0,
                  gamma: float = 1.0, batch_size: int = 32, progress: bool = False):
    """Fisher + anchors of ``model`` on the train splits of ``tasks`` (the data it was trained on)."""
    from . import ewc

    pool = [t for t in tasks if t.samples["train"]]
    if not pool:
        raise DataError("no training images to estimate the Fisher from")
    n = min(n_samples, sum(len(t.samples["train"]) for t in pool))
    fisher = ewc.estimate_fisher(model, _concat_loader(pool, "train", batch_size, seed), n_samples=n,
                                 draws=draws, seed=seed, progress=progress)
    name = "+".join(t.name for t in pool)
    return ewc.EWCState.from_model(model, fisher, backbone=card.backbone, classes=card.classes,
                                   task=ewc.TaskRecord(name, n, "sampled", draws, tuple(card.classes)), gamma=gamma)


def _old_tasks(specs: Sequence[DataSpec], classes: Sequence[str], card, cfg: ExtendConfig, *,
               required: bool, echo: Callable[[str], None]) -> list[TaskSet]:
    from .data import resolve_splits

    out = []
    for spec in specs:
        try:
            splits = resolve_splits(spec)
        except (DataError, OSError) as exc:
            if required:
                raise DataError(f"old data {task_name(spec)}: {exc}") from None
            echo(f"note: old data {task_name(spec)} unavailable ({exc}); old-task accuracy is not measured")
            continue
        out.append(TaskSet.from_splits(task_name(spec), splits, classes, card.input, cfg.augment, spec=spec,
                                       cache=cfg.cache_images))
    return out


def finalize_run(source: str | Path, *, data: DataSpec | None = None, n_samples: int = 512, draws: int = 1,
                 seed: int = 0, gamma: float = 1.0, device: str = "auto", progress: bool = False,
                 echo: Callable[[str], None] = print) -> Path:
    """Compute ``fisher.safetensors`` beside a trained checkpoint from its training data.

    ``data`` defaults to the model card's data spec. Returns the file's path.
    """
    from .checkpoint import load_model
    from .trainer import pick_device

    dev = pick_device(device)
    model, card = load_model(source, device=dev)
    spec = data or (DataSpec.from_dict(card.data, where="model.json: data") if card.data else None)
    if spec is None:
        raise DataError(f"{source}: model.json has no data spec; pass --data")
    tasks = _old_tasks([spec], card.classes, card, ExtendConfig(source=str(source), out=".", data=spec),
                       required=True, echo=echo)
    t0 = time.perf_counter()
    state = compute_state(model, card, tasks, n_samples=n_samples, draws=draws, seed=seed, gamma=gamma,
                          progress=progress)
    path = state.save(fisher_path(source))
    echo(f"Fisher diagonal + anchors of {card.backbone} on {state.tasks[0].n_samples} {tasks[0].name} "
         f"images ({time.perf_counter() - t0:.1f}s) -> {path}")
    return path


def run(cfg: ExtendConfig, *, overwrite: bool = False, progress: bool = False,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """``defectscope extend`` without the parser: load, extend, write the output run directory."""
    from . import checkpoint as ckpt
    from . import ewc
    from .data import resolve_splits
    from .trainer import pick_device, setup_runtime

    setup_runtime(cfg.threads, cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    if (out / ckpt.BEST).exists() and not overwrite:
        raise FileExistsError(f"{out}: holds a model already; pass --overwrite or another --out")
    if Path(cfg.out).resolve() == (Path(cfg.source) if Path(cfg.source).is_dir() else Path(cfg.source).parent).resolve():
        raise ConfigError("out: must differ from the source run directory")
    model, card = ckpt.load_model(cfg.source, device=device)
    old_classes = list(card.classes)

    # -- Fisher/anchors of the source model (checked against its weights)
    fpath = Path(cfg.fisher) if cfg.fisher else fisher_path(cfg.source)
    state = None
    if fpath.is_file():
        state = ewc.EWCState.load(fpath)
        state.check_model(model, backbone=card.backbone, source=str(fpath))
        echo(f"Fisher/anchors: {fpath} (tasks {[t.name for t in state.tasks]})")
    elif cfg.fisher:
        raise ewc.EWCError(f"{fpath}: no such Fisher file")

    # -- data
    new_splits = resolve_splits(cfg.data)
    classes = old_classes + [c for c in new_splits.classes if c not in old_classes]
    new = TaskSet.from_splits(task_name(cfg.data), new_splits, classes, card.input, cfg.augment, spec=cfg.data,
                              cache=cfg.cache_images)
    if cfg.old_data is None:
        old_specs = [DataSpec.from_dict(card.data, where=f"{cfg.source}: model.json: data")] if card.data else []
    else:
        old_specs = list(cfg.old_data)
    need_old = bool(cfg.replay) or cfg.lam == "auto" or (cfg.method == "ewc" and state is None)
    olds = _old_tasks(old_specs, classes, card, cfg, required=need_old and cfg.old_data is not None, echo=echo)
    echo(f"new task {new.name}: {len(new.samples['train'])}/{len(new.samples['val'])}/{len(new.samples['test'])} "
         f"train/val/test, classes {[classes[c] for c in new.present_classes()]}; old tasks "
         f"{[t.name for t in olds] or 'none'}")

    if state is None and cfg.method == "ewc":
        if not olds:
            raise ewc.EWCError(
                f"{fpath}: no Fisher/anchor file, and no old data to compute it from; run "
                f"`defectscope extend --from {cfg.source} --finalize` where the old images are, or pass --old-data")
        echo(f"no {fpath.name} beside the checkpoint: computing it from {[t.name for t in olds]} ...")
        state = compute_state(model, card, olds, n_samples=cfg.fisher_samples, draws=cfg.fisher_draws,
                              seed=cfg.seed, gamma=cfg.gamma, batch_size=cfg.batch_size, progress=progress)
        try:
            state.save(fpath)
            echo(f"saved {fpath} (reused by later extensions of this model)")
        except OSError as exc:
            echo(f"note: cannot write {fpath} ({exc}); it is used for this run only")

    outcome = extend_model(model, old_classes, new, olds, state, cfg, backbone=card.backbone, device=device,
                           progress=progress, echo=echo)
    report = outcome.report
    report.update(source=str(cfg.source), config_hash=cfg.hash())

    # -- outputs (model + card first, then the report)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(out / "config.json", {**cfg.to_dict(), "config_hash": cfg.hash()})
    src_weights = Path(cfg.source) / ckpt.BEST if Path(cfg.source).is_dir() else Path(cfg.source)
    good = list(dict.fromkeys([*card.good_classes, *[c for c in new.good_classes if c in classes]]))
    keep = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auroc")
    new_card = ckpt.ModelCard(
        backbone=card.backbone, num_classes=len(classes), classes=tuple(classes), good_classes=tuple(good),
        input=card.input, weights=str(src_weights), data=cfg.data.to_dict(), dataset_fingerprint=new.fingerprint,
        config_hash=cfg.hash(),
        metrics={"test": {k: (report["new"]["after"] or {}).get(k) for k in keep},
                 "old_tasks": {n: {k: (v["after"] or {}).get(k) for k in keep} for n, v in report["old"].items()},
                 "forgetting": report["forgetting"], "extended_from": str(cfg.source)})
    ckpt.save_model(out, model, new_card)
    if outcome.state is not None:
        outcome.state.save(out)
    ckpt.atomic_write_json(out / "metrics.json", outcome.epochs)
    ckpt.atomic_write_json(out / "report.json", {**report, "history": outcome.history.to_dict()})
    ewc.plot_report(report, outcome.history, out / REPORT_PNG)
    echo(summary_text(report))
    echo(f"-> {out}")
    return report


def summary_text(report: Mapping[str, Any]) -> str:
    """The before/after table printed at the end of a run."""
    fmt = lambda v: "   n/a" if v is None else f"{v:6.4f}"  # noqa: E731
    lines = [f"{'task':<28}{'before':>8}{'after':>8}{'change':>9}"]
    nb, na = report.get("new_accuracy_before"), report.get("new_accuracy_after")
    lines.append(f"{'new: ' + str(report.get('new_task')):<28}{fmt(nb):>8}{fmt(na):>8}"
                 f"{'' if nb is None or na is None else f'{na - nb:+9.4f}'}")
    for name, v in (report.get("old") or {}).items():
        b, a = _acc(v["before"]), _acc(v["after"])
        lines.append(f"{'old: ' + name:<28}{fmt(b):>8}{fmt(a):>8}{'' if b is None or a is None else f'{a - b:+9.4f}'}")
    f = report.get("forgetting")
    lines.append(f"method {report.get('method')}, lambda {report.get('lambda'):g}, BN {report.get('bn')}; "
                 f"forgetting {'n/a (no old data)' if f is None else f'{f:.4f}'}; "
                 f"penalty share of the loss {report.get('penalty_share', 0.0):.3f}")
    for name, lg in (report.get("old_class_logits") or {}).items():
        lines.append(f"old-class logits on {name}: mean |change| {lg['old_logits_mean_abs_change']:.4f}, "
                     f"old argmax kept {lg['old_argmax_agreement']:.3f}, predicted as a new class "
                     f"{lg['predicted_as_new_class']:.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

EPILOG = """\
methods (combine freely):
  --method ewc      (default) L = CE_new + lambda * sum_i F_i (theta_i - theta*_i)^2, F the Fisher
                    diagonal of the source model on its own data (fisher.safetensors beside it)
  --method naive    plain fine-tuning on the new data (the baseline that forgets)
  --replay 10%|N    mix a class-balanced buffer of old training images into every epoch

lambda: --lambda 100 (default; F is a per-image mean, CE a per-image mean) or --lambda auto: train
  with each of --lambda-grid and keep the one with the best mean of old and new validation accuracy.

scenarios (from the data): same classes -> new domain; unknown class names -> the head grows,
  old rows copied bit-exact (--freeze-old-rows keeps them so), new rows trained freely.

BN: running statistics stay frozen by default (--bn frozen): EWC protects parameters, and BN
  statistics re-estimated on a new line shift every old-line feature. --bn update lets them adapt.

outputs (--out): model.json, best.safetensors, fisher.safetensors (online EWC: gamma * F_old + F_new,
  for the next line), config.json, metrics.json (per epoch), report.json (old/new accuracy before and
  after, forgetting, penalty share, old-class logits), ewc_report.png

examples:
  defectscope extend --from runs/mono --finalize
  defectscope extend --from runs/mono --data elpv --cell-types poly --out runs/mono+poly
  defectscope extend --from runs/mono --data ./line2 --replay 10% --lambda auto --out runs/line2
  defectscope extend --from runs/line2 --data ./line3 --gamma 0.9 --out runs/line3 --old-data ./line2
"""


def _source_of(data: str) -> tuple[str, str | None]:
    # same rule as `defectscope train --data`
    if data == "elpv":
        return "elpv", None
    if data.lower().endswith(".csv"):
        return "csv", data
    return "folder", data


def _old_spec(arg: str) -> DataSpec | None:
    """``--old-data``: elpv | DIR | FILE.csv | FILE.json/.toml (DataSpec keys) | none."""
    if arg == "none":
        return None
    p = Path(arg)
    if p.suffix.lower() in (".json", ".toml") and p.is_file():
        from .config import read_config_file

        return DataSpec.from_dict(read_config_file(p), where=str(p))
    src, path = _source_of(arg)
    return DataSpec(source=src, path=path)


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(
        prog="defectscope extend", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Extend a trained model to a new product line or new defect classes without forgetting "
                    "the old ones (Elastic Weight Consolidation, replay, or both).")
    p.add_argument("--from", dest="source", required=True, metavar="RUN",
                   help="source run directory (or .safetensors with model.json beside it)")
    p.add_argument("--out", help="output run directory (required unless --finalize)")
    p.add_argument("--finalize", action="store_true",
                   help="only compute fisher.safetensors beside the source checkpoint (from its training data, "
                        "or --data) and exit")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--config", help="TOML/JSON file with ExtendConfig keys; flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    d = p.add_argument_group("new data (as for `defectscope train`)")
    d.add_argument("--data", default=S, help="'elpv', an ImageFolder directory, or a CSV manifest")
    d.add_argument("--data-source", choices=("folder", "csv", "elpv"), default=S, help="force the layout")
    d.add_argument("--labels", choices=("binary", "4class"), default=S, help="ELPV labels")
    d.add_argument("--cell-types", default=S, help="ELPV cell types, comma-separated (mono,poly)")
    d.add_argument("--test-fraction", type=float, default=S)
    d.add_argument("--val-fraction", type=float, default=S)
    d.add_argument("--good-classes", default=S, help="comma-separated 'no defect' classes")
    d.add_argument("--limit", type=int, default=S, help="at most N images per split (smoke runs)")
    d.add_argument("--old-data", action="append", default=S, metavar="SPEC",
                   help="old task data for evaluation, replay and a missing Fisher: 'elpv', a folder, a CSV, a "
                        ".json/.toml DataSpec file, or 'none' (repeatable; default: the source model card's data)")

    m = p.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, default=S, help="ewc (default) or naive")
    m.add_argument("--lambda", dest="lam", default=S, metavar="L|auto", help="penalty strength (100) or 'auto'")
    m.add_argument("--lambda-grid", default=S, help="candidates for --lambda auto (10,100,1000,10000)")
    m.add_argument("--gamma", type=float, default=S, help="online-EWC decay of the old Fisher (1.0)")
    m.add_argument("--fisher", default=S, help="Fisher file (default: fisher.safetensors beside --from)")
    m.add_argument("--fisher-samples", type=int, default=S, help="images per Fisher estimate (512)")
    m.add_argument("--fisher-draws", type=int, default=S, help="labels sampled from the model per image (1)")
    m.add_argument("--replay", default=S, help="replay buffer: share of old train images (10%%) or a count (200)")
    m.add_argument("--replay-share", type=float, default=S,
                   help="repeat the buffer to make this share of each epoch (0.2; 0: seen once, its natural share)")
    m.add_argument("--bn", choices=BN_MODES, default=S, help="BN running statistics (frozen)")
    m.add_argument("--freeze-old-rows", action="store_true", default=S,
                   help="new classes: keep the old head rows bit-exact during training")
    m.add_argument("--no-fisher", action="store_true", default=S,
                   help="do not write the consolidated fisher.safetensors into --out")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=S, help="(5)")
    o.add_argument("--batch-size", type=int, default=S, help="(32)")
    o.add_argument("--lr", type=float, default=S, help="head LR (3e-4); lower groups lr * lr_decay**k")
    o.add_argument("--lr-decay", type=float, default=S, help="(0.75)")
    o.add_argument("--weight-decay", type=float, default=S, help="AdamW decay (0: it pulls away from the anchors)")
    o.add_argument("--warmup-epochs", type=float, default=S, help="(0.5)")
    o.add_argument("--label-smoothing", type=float, default=S, help="(0.1)")
    o.add_argument("--grad-clip", type=float, default=S, help="max gradient norm, 0 = off (1.0)")
    o.add_argument("--balance", choices=("loss", "sampler", "none"), default=S, help="(loss)")
    o.add_argument("--no-augment", action="store_true", default=S, help="disable augmentation")
    o.add_argument("--seed", type=int, default=S, help="(0)")
    o.add_argument("--threads", type=int, default=S)
    o.add_argument("--device", default=S, help="auto | cpu | cuda[:N]")
    o.add_argument("--no-amp", action="store_true", default=S)
    o.add_argument("--max-steps-per-epoch", type=int, default=S, help="cap batches per epoch (smoke runs)")
    return p


def config_from_args(ns: argparse.Namespace) -> ExtendConfig:
    """Defaults < ``--config`` file < flags."""
    a = vars(ns)
    base: dict[str, Any] = {}
    if a.get("config"):
        from .config import read_config_file

        base = read_config_file(a["config"])
    d: dict[str, Any] = dict(base)
    d["source"] = a["source"]
    if a.get("out"):
        d["out"] = a["out"]
    d.setdefault("out", "")
    data = dict(d.get("data") or {})
    if "data" in a:
        data["source"], data["path"] = _source_of(a["data"])
    if "data_source" in a:
        data["source"] = a["data_source"]
    for k in ("labels", "cell_types", "test_fraction", "val_fraction", "good_classes", "limit"):
        if k in a:
            data[k] = a[k]
    if "seed" in a:
        data.setdefault("seed", a["seed"])
    d["data"] = data
    if "old_data" in a:
        specs = [_old_spec(s) for s in a["old_data"]]
        d["old_data"] = tuple(s for s in specs if s is not None)
    if "lam" in a:
        v = str(a["lam"]).strip().lower()
        try:
            d["lam"] = "auto" if v == "auto" else float(v)
        except ValueError:
            raise ConfigError(f"--lambda: expected a number or 'auto', got {a['lam']!r}") from None
    if "lambda_grid" in a:
        try:
            d["lambda_grid"] = tuple(float(x) for x in str(a["lambda_grid"]).split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--lambda-grid: expected comma-separated numbers, got {a['lambda_grid']!r}") from None
    for k in ("method", "gamma", "fisher", "fisher_samples", "fisher_draws", "replay", "replay_share", "bn",
              "freeze_old_rows", "epochs", "batch_size", "lr", "lr_decay", "weight_decay", "warmup_epochs",
              "label_smoothing", "balance", "seed", "threads", "device", "max_steps_per_epoch"):
        if k in a:
            d[k] = a[k]
    if "grad_clip" in a:
        d["grad_clip"] = a["grad_clip"] or None
    if a.get("no_augment"):
        d["augment"] = "none"
    if a.get("no_amp"):
        d["amp"] = False
    if a.get("no_fisher"):
        d["write_fisher"] = False
    if "data" not in a and not base.get("data") and not a.get("finalize"):
        raise ConfigError("--data: required (the new product line's images)")
    return ExtendConfig.from_dict(d, where=a.get("config") or "command line")


def main(argv: list[str] | None = None) -> int:
    """``defectscope extend``."""
    ns = build_parser().parse_args(argv)
    progress = not ns.quiet and sys.stderr.isatty()
    try:
        cfg = config_from_args(ns)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    from .ewc import EWCError

    try:
        if ns.finalize:
            from .trainer import setup_runtime

            setup_runtime(cfg.threads, cfg.seed)
            finalize_run(cfg.source, data=cfg.data if "data" in vars(ns) else None, n_samples=cfg.fisher_samples,
                         draws=cfg.fisher_draws, seed=cfg.seed, gamma=cfg.gamma, device=cfg.device,
                         progress=progress)
            return 0
        if not cfg.out:
            raise ConfigError("--out: required (the extended model's run directory)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*vmap.*")
            run(cfg, overwrite=ns.overwrite, progress=progress)
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written to --out unless it says so above", file=sys.stderr)
        return 130
    except (ConfigError, DataError, CheckpointError, EWCError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
