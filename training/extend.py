"""``defectscope extend``: teach a trained model a new product line or new defect classes
without forgetting the old ones (EWC, a replay buffer, or both; naive fine-tuning for comparison).

Two scenarios, chosen by the data: (a) the new line's classes are the model's classes
(a new domain); (b) the new data brings classes the model does not know: the head grows
(old rows copied bit-exact, see ``training.backbones.Classifier.grow_head``) and the penalty keeps the
backbone and the old rows near their anchors while the new rows learn freely.

The Fisher diagonal and anchors of the source model come from ``fisher.safetensors``
beside its checkpoint (``--finalize`` writes it; ``extend`` computes and saves it there on
first use when the old data is at hand), so later extensions do not need the old images.
The extended run directory gets a consolidated (online-EWC) ``fisher.safetensors`` for
the next product line.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.preprocess import InputSpec

from .config import AugmentConfig, ConfigError
from .data import DataError, DataSpec
from .extend_config import ExtendConfig, task_name

REPORT_PNG = "ewc_report.png"


# ----------------------------------------------------------------------------- tasks


class TaskSet:
    """One task's train/val/test samples, labelled in the model's class space, with a shared
    decoded-image cache (the train augmentations and the evaluation transform reuse it)."""

    def __init__(self, name: str, samples: Mapping[str, Sequence[Any]], classes: Sequence[str],
                 input_spec: InputSpec, augment: AugmentConfig, *, cache: bool = True,
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
    def from_splits(cls, name: str, splits: Any, classes: Sequence[str], input_spec: InputSpec,
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

    ds: ConcatDataset = ConcatDataset([t.dataset(split) for t in tasks])
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- evaluation


def evaluate_task(model, task: TaskSet, split: str, classes: Sequence[str], batch_size: int = 64):
    """``(metrics, logits (N, C))`` of ``model`` on a task split; metrics in ``classes`` space.

    A model with fewer outputs than ``classes`` (before head growth) scores 0 on the
    classes it lacks.
    """
    import torch

    from .engine import Engine, device_of
    from .metrics import classification_metrics

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


def _acc(m: Mapping[str, Any] | None) -> float | None:
    return None if m is None else m.get("accuracy")


def _mean(vals: Sequence[float | None]) -> float | None:
    known = [v for v in vals if v is not None]
    return sum(known) / len(known) if known else None


def _diff(before: float | None, after: float | None) -> float | None:
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
        return {"old_logits_max_abs_change": 0.0, "old_logits_mean_abs_change": 0.0,
                "old_argmax_agreement": float("nan"), "predicted_as_new_class": float("nan")}
    return {
        "old_logits_max_abs_change": float(diff.max()),
        "old_logits_mean_abs_change": float(diff.mean()),
        "old_argmax_agreement": float((a.argmax(1) == before.argmax(1)).float().mean()),
        "predicted_as_new_class": float((after.argmax(1) >= old_classes).float().mean()),
    }


# ----------------------------------------------------------------------------- core


@dataclass
class FitHistory:
    """Per-step task loss and EWC penalty of one lambda's training, and per-epoch summaries."""

    task_loss: list[float] = field(default_factory=list)
    penalty: list[float] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)

    @property
    def penalty_share(self) -> float:
        """Penalty's share of the total loss summed over all steps."""
        tot = sum(self.task_loss) + sum(self.penalty)
        return sum(self.penalty) / tot if tot > 0 else 0.0

    def add(self, epoch: int, stats: Any) -> dict[str, float]:
        """Fold in one ``training.engine.EpochStats``; the epoch's summary."""
        pen = stats.terms.get("ewc") or [0.0] * len(stats.task_loss)
        self.task_loss += stats.task_loss
        self.penalty += pen
        summary = {"epoch": epoch + 1, "task_loss": sum(stats.task_loss) / max(1, len(stats.task_loss)),
                   "penalty": sum(pen) / max(1, len(pen)), "train_accuracy": stats.train_accuracy,
                   "seconds": stats.seconds}
        self.epochs.append(summary)
        return summary

    def to_dict(self) -> dict[str, Any]:
        return {"task_loss": self.task_loss, "penalty": self.penalty, "epochs": self.epochs,
                "penalty_share": self.penalty_share}


@dataclass
class Outcome:
    """What :func:`extend_model` returns: the extended model (in place) and its report."""

    model: Any
    classes: list[str]
    report: dict[str, Any]
    history: FitHistory                # of the chosen lambda
    epochs: list[dict[str, Any]]       # per-epoch records of the chosen lambda
    state: Any | None = None           # consolidated EWCState for the extended model


def _engine(cfg: ExtendConfig, labels, nc: int, device, terms, hooks, progress: bool):
    import torch

    from .engine import ClassificationTask, Engine
    from .loader import class_weights

    o = cfg.optim
    cw = class_weights(labels, nc).to(device) if o.balance == "loss" else None
    task = ClassificationTask(torch.nn.CrossEntropyLoss(weight=cw, label_smoothing=o.label_smoothing))
    return Engine(task=task, device=device, amp=o.amp, channels_last=o.channels_last, grad_clip=o.grad_clip,
                  bn_frozen=cfg.bn == "frozen", terms=terms, after_step=hooks, progress=progress)


def _train_once(model, train_ds, train_labels, *, lam: float, state, cfg: ExtendConfig, device, classes,
                new: TaskSet, olds: Sequence[TaskSet], hooks, progress: bool, echo: Callable[[str], None]):
    """Train with one lambda through the engine; ``(history, per-epoch records)``, weights per ``cfg.keep``."""
    import numpy as np

    from . import ewc
    from .engine import EpochSelector
    from .loader import make_loader
    from .schedule import build_optimizer

    o, nc = cfg.optim, len(classes)
    labels = np.asarray(train_labels, dtype=np.int64)
    # One loader for all epochs: its generator, seeded once, reshuffles every epoch.
    loader = make_loader(train_ds, labels, nc, o.batch_size, train=True, balance=o.balance, seed=o.seed,
                         pin_memory=device.type == "cuda")
    steps = len(loader) if o.max_steps_per_epoch is None else min(len(loader), o.max_steps_per_epoch)
    model.set_trainable(None)
    opt, sched = build_optimizer(model, len(model.groups), o.lr, o.lr_decay, o.weight_decay,
                                 total_steps=max(1, steps * cfg.epochs), warmup_steps=int(round(o.warmup_epochs * steps)))
    terms = [ewc.EWCPenalty(state, model, lam)] if (lam > 0 and state is not None) else []
    engine = _engine(cfg, labels, nc, device, terms, hooks, progress)
    hist, records, sel, best_sd = FitHistory(), [], EpochSelector(), None
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for epoch in range(cfg.epochs):
        st = engine.run_epoch(model, loader, opt, scheduler=sched, steps=o.max_steps_per_epoch,
                              desc=f"epoch {epoch + 1}/{cfg.epochs}")
        rec: dict[str, Any] = dict(hist.add(epoch, st), lam=lam)
        rec["new_val_accuracy"] = _acc(evaluate_task(model, new, "val", classes)[0])
        rec["old_val_accuracy"] = _mean([_acc(evaluate_task(model, t, "val", classes)[0]) for t in olds])
        score = _mean([rec["old_val_accuracy"], rec["new_val_accuracy"]])
        rec["score"] = score
        if sel.update(epoch + 1, -float("inf") if score is None else score) and cfg.keep == "best":
            best_sd = copy.deepcopy(model.state_dict())
        records.append(rec)
        echo(f"  [lambda {lam:g}] epoch {epoch + 1}/{cfg.epochs}: CE {rec['task_loss']:.4f} "
             f"penalty {rec['penalty']:.4f}  val new {fmt(rec['new_val_accuracy'])} "
             f"old {fmt(rec['old_val_accuracy'])}  ({rec['seconds']:.1f}s)")
    model.eval()
    if best_sd is not None:
        model.load_state_dict(best_sd)
        records = records[: sel.best_epoch]   # the kept weights' record is the last one
        echo(f"  [lambda {lam:g}] kept epoch {sel.best_epoch} (best mean of old/new val accuracy)")
    return hist, records


def _before(model, new: TaskSet, olds: Sequence[TaskSet], classes: list[str]):
    new_before, _ = evaluate_task(model, new, "test", classes)
    old_before, old_logits = {}, {}
    for t in olds:
        old_before[t.name], old_logits[t.name] = evaluate_task(model, t, "test", classes)
    return new_before, old_before, old_logits


def _grow(model, classes: list[str], n_old: int, olds: Sequence[TaskSet], old_logits: Mapping[str, Any],
          cfg: ExtendConfig, echo: Callable[[str], None]) -> tuple[dict[str, Any], list[Callable[[], None]]]:
    """Scenario (b): widen the head; the growth report and the after-step hooks it needs."""
    from .heads import HeadRowFreeze

    head = model.grow_head(len(classes), seed=cfg.optim.seed)
    growth: dict[str, Any] = {"head": head, "old_classes": n_old, "new_classes": classes[n_old:]}
    for t in olds:
        if old_logits[t.name] is not None:
            _, after = evaluate_task(model, t, "test", classes)
            growth[f"old_logits_max_abs_change_at_growth[{t.name}]"] = float(
                (after[:, :n_old] - old_logits[t.name]).abs().max())
    echo(f"head grown {n_old} -> {len(classes)} classes: + {growth['new_classes']}")
    return growth, [HeadRowFreeze(model, head, n_old)] if cfg.freeze_old_rows else []


def _search(model, train_ds, train_labels, state, cfg: ExtendConfig, device, classes, new, olds, hooks,
            progress: bool, echo: Callable[[str], None]):
    """Train with each lambda from the same start; keep the best by mean old/new val accuracy."""
    from .trainer import seed_everything

    start = copy.deepcopy(model.state_dict())
    runs, best = [], None
    for lam in cfg.lambdas:
        model.load_state_dict(start)
        seed_everything(cfg.optim.seed)
        t0 = time.perf_counter()
        hist, records = _train_once(model, train_ds, train_labels, lam=lam, state=state, cfg=cfg, device=device,
                                    classes=classes, new=new, olds=olds, hooks=hooks, progress=progress, echo=echo)
        last = records[-1] if records else {}
        score = _mean([last.get("old_val_accuracy"), last.get("new_val_accuracy")])
        runs.append({"lambda": lam, "new_val_accuracy": last.get("new_val_accuracy"),
                     "old_val_accuracy": last.get("old_val_accuracy"), "score": score,
                     "penalty_share": hist.penalty_share, "train_s": time.perf_counter() - t0})
        if best is None or (score is not None and (best[0] is None or score > best[0])):
            best = (score, lam, copy.deepcopy(model.state_dict()) if len(cfg.lambdas) > 1 else None, hist, records)
    assert best is not None   # cfg.lambdas is never empty
    score, lam, best_sd, hist, records = best
    if best_sd is not None:
        model.load_state_dict(best_sd)
    if len(cfg.lambdas) > 1:
        echo(f"lambda auto: picked {lam:g} (mean of old/new val accuracy {score:.4f}) from {list(cfg.lambdas)}")
    return lam, hist, records, runs


def _fold_fisher(model, state, new: TaskSet, cfg: ExtendConfig, backbone: str, classes, progress: bool):
    """Online EWC: this task's Fisher folded into the state, for the next extension."""
    from . import ewc

    n = min(cfg.fisher_samples, len(new.samples["train"]))
    f_new = ewc.estimate_fisher(model, new.loader("train", cfg.optim.batch_size, shuffle=True, seed=cfg.optim.seed),
                                n_samples=n, draws=cfg.fisher_draws, seed=cfg.optim.seed, progress=progress)
    record = ewc.TaskRecord(new.name, n, "sampled", cfg.fisher_draws,
                            tuple(new.classes[c] for c in new.present_classes()))
    return ewc.consolidate(state, model, f_new, task=record, backbone=backbone, classes=classes, gamma=cfg.gamma)


def _check_inputs(classes: list[str], old_classes: list[str], olds: Sequence[TaskSet], state,
                  cfg: ExtendConfig) -> None:
    from .ewc import EWCError

    if classes[: len(old_classes)] != old_classes:
        raise ValueError(f"extended classes {classes} must start with the model's classes {old_classes}")
    if cfg.method == "ewc" and state is None:
        raise EWCError("method 'ewc' needs the source model's Fisher/anchor state")
    if cfg.lam == "auto" and not any(t.samples["val"] for t in olds):
        raise DataError("--lambda auto scores candidates on old-task validation data; none is available "
                        "(give --old-data, or a fixed --lambda)")


def extend_model(model, old_classes: Sequence[str], new: TaskSet, olds: Sequence[TaskSet], state,
                 cfg: ExtendConfig, *, backbone: str, device=None, progress: bool = False,
                 echo: Callable[[str], None] = print) -> Outcome:
    """Fine-tune ``model`` (a ``training.backbones.Classifier``, in place) on ``new``; no disk I/O.

    ``new``/``olds`` are labelled in the extended class list ``new.classes`` (the old
    classes first). ``state`` is the source model's :class:`training.ewc.EWCState`
    (required for ``method="ewc"``; used to fold the new Fisher into for online EWC).
    """
    import torch

    from .engine import device_of
    from .replay import mix_tasks

    t_start = time.perf_counter()
    device = device or device_of(model)
    classes, old_classes = list(new.classes), list(old_classes)
    _check_inputs(classes, old_classes, olds, state, cfg)
    grown = len(classes) > len(old_classes)
    t0 = time.perf_counter()
    new_before, old_before, old_logits_before = _before(model, new, olds, classes)
    eval_s = time.perf_counter() - t0
    growth, hooks = _grow(model, classes, len(old_classes), olds, old_logits_before, cfg, echo) if grown else (None, [])

    train_ds, train_labels, replay_info = new.dataset("train", train=True, progress=progress), new.labels("train"), None
    if cfg.replay:
        try:
            train_ds, train_labels, replay_info = mix_tasks(train_ds, train_labels, olds, cfg.replay,
                                                            share=cfg.replay_share, seed=cfg.optim.seed, classes=classes)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        echo(f"replay buffer: {replay_info['size']} old exemplars {replay_info['per_class']}, "
             f"x{replay_info['repeats_per_epoch']} per epoch")
    if cfg.optim.channels_last:
        model.to(memory_format=torch.channels_last)
    lam, hist, records, runs = _search(model, train_ds, train_labels, state, cfg, device, classes, new, olds, hooks,
                                       progress, echo)

    t0 = time.perf_counter()
    new_after, _ = evaluate_task(model, new, "test", classes)
    old_after, old_logits = {}, {}
    for t in olds:
        old_after[t.name], logits = evaluate_task(model, t, "test", classes)
        if grown and logits is not None:
            old_logits[t.name] = old_logit_report(old_logits_before[t.name], logits, len(old_classes))
            old_logits[t.name]["old_accuracy_within_old_classes"] = accuracy(
                logits, torch.tensor(t.labels("test")), range(len(old_classes)))
    eval_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    new_state = _fold_fisher(model, state, new, cfg, backbone, classes, progress) if cfg.write_fisher else None
    fisher_s = time.perf_counter() - t0 if cfg.write_fisher else 0.0

    report = _report(cfg, lam, runs, hist, classes, grown, new, olds, (new_before, new_after),
                     (old_before, old_after), growth, old_logits, replay_info, state)
    report["timing_s"] = {"total": time.perf_counter() - t_start, "train": sum(r["train_s"] for r in runs),
                          "eval": eval_s, "fisher": fisher_s}
    return Outcome(model, classes, report, hist, records, new_state)


def _report(cfg: ExtendConfig, lam, runs, hist: FitHistory, classes, grown: bool, new: TaskSet, olds,
            new_ba, old_ba, growth, old_logits, replay_info, state) -> dict[str, Any]:
    (new_before, new_after), (old_before, old_after) = new_ba, old_ba
    ob, oa = _mean([_acc(m) for m in old_before.values()]), _mean([_acc(m) for m in old_after.values()])
    return {
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
        "forgetting": _diff(ob, oa),
        "penalty_share": hist.penalty_share,
        "new": {"before": new_before, "after": new_after},
        "old": {t.name: {"before": old_before[t.name], "after": old_after[t.name],
                         "forgetting": _diff(_acc(old_before[t.name]), _acc(old_after[t.name]))} for t in olds},
        "head_growth": growth,
        "old_class_logits": old_logits or None,
        "replay": replay_info,
        "fisher": None if state is None else {"tasks": [asdict(t) for t in state.tasks],
                                              "anchor_sha256": state.anchor_sha256, "gamma": state.gamma},
    }


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
        out.append(TaskSet.from_splits(task_name(spec), splits, classes, card.input, cfg.optim.augment, spec=spec,
                                       cache=cfg.optim.cache_images))
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

    setup_runtime(cfg.optim.threads, cfg.optim.seed)
    device = pick_device(cfg.optim.device)
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
    new = TaskSet.from_splits(task_name(cfg.data), new_splits, classes, card.input, cfg.optim.augment, spec=cfg.data,
                              cache=cfg.optim.cache_images)
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
                              seed=cfg.optim.seed, gamma=cfg.gamma, batch_size=cfg.optim.batch_size, progress=progress)
        try:
            state.save(fpath)
            echo(f"saved {fpath} (reused by later extensions of this model)")
        except OSError as exc:
            echo(f"note: cannot write {fpath} ({exc}); it is used for this run only")

    outcome = extend_model(model, old_classes, new, olds, state, cfg, backbone=card.backbone, device=device,
                           progress=progress, echo=echo)
    report = outcome.report
    report.update(source=str(cfg.source), config_hash=cfg.hash())

    _write_run(out, cfg, card, model, classes, new, outcome)
    echo(summary_text(report))
    echo(f"-> {out}")
    return report


def _write_run(out: Path, cfg: ExtendConfig, card, model, classes: list[str], new: TaskSet, outcome: Outcome) -> None:
    """The output run directory: model + card first, then Fisher, metrics, report and plot."""
    from runtime.fsio import atomic_write_json

    from . import checkpoint as ckpt

    report = outcome.report
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**cfg.to_dict(), "config_hash": cfg.hash()})
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
    atomic_write_json(out / "metrics.json", outcome.epochs)
    atomic_write_json(out / "report.json", {**report, "history": outcome.history.to_dict()})
    from .metrics import plot_forgetting

    plot_forgetting(report, outcome.history, out / REPORT_PNG)


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
