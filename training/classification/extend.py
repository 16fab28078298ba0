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

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from training.classification.extend_config import ExtendConfig
from training.classification.extend_report import extension_report
from training.classification.taskset import TaskSet, accuracy, accuracy_of, evaluate_task, mean_of, old_logit_report
from training.data import DataError

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
        summary = {
            "epoch": epoch + 1,
            "task_loss": sum(stats.task_loss) / max(1, len(stats.task_loss)),
            "penalty": sum(pen) / max(1, len(pen)),
            "train_accuracy": stats.train_accuracy,
            "seconds": stats.seconds,
        }
        self.epochs.append(summary)
        return summary

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_loss": self.task_loss,
            "penalty": self.penalty,
            "epochs": self.epochs,
            "penalty_share": self.penalty_share,
        }


@dataclass
class Outcome:
    """What :func:`extend_model` returns: the extended model (in place) and its report."""

    model: Any
    classes: list[str]
    report: dict[str, Any]
    history: FitHistory  # of the chosen lambda
    epochs: list[dict[str, Any]]  # per-epoch records of the chosen lambda
    state: Any | None = None  # consolidated EWCState for the extended model


@dataclass
class _Context:
    """What every lambda's training shares: the model, its data, the state and the config."""

    model: Any
    train_ds: Any
    train_labels: Sequence[int]
    state: Any
    cfg: ExtendConfig
    device: Any
    classes: list[str]
    new: TaskSet
    olds: Sequence[TaskSet]
    hooks: list[Callable[[], None]]
    progress: bool
    echo: Callable[[str], None]


def _engine(cfg: ExtendConfig, labels, nc: int, device, terms, hooks, progress: bool):
    import torch

    from training.classification.loader import class_weights
    from training.classification.task import ClassificationTask
    from training.engine import Engine

    o = cfg.optim
    cw = class_weights(labels, nc).to(device) if o.balance == "loss" else None
    task = ClassificationTask(torch.nn.CrossEntropyLoss(weight=cw, label_smoothing=o.label_smoothing))
    return Engine(
        task=task,
        device=device,
        amp=o.amp,
        channels_last=o.channels_last,
        grad_clip=o.grad_clip,
        bn_frozen=cfg.bn == "frozen",
        terms=terms,
        after_step=hooks,
        progress=progress,
    )


def _train_once(ctx: _Context, lam: float):
    """Train with one lambda through the engine; ``(history, per-epoch records)``, weights per ``cfg.keep``."""
    model, cfg, device, classes, new, olds = ctx.model, ctx.cfg, ctx.device, ctx.classes, ctx.new, ctx.olds
    train_ds, train_labels, state, echo = ctx.train_ds, ctx.train_labels, ctx.state, ctx.echo
    import numpy as np

    from training import distributed as dist
    from training import ewc
    from training.classification.loader import make_loader
    from training.engine import fit_epochs
    from training.schedule import build_optimizer

    o, nc = cfg.optim, len(classes)
    labels = np.asarray(train_labels, dtype=np.int64)
    # One loader for all epochs: its generator, seeded once, reshuffles every epoch.
    # Distributed: the same generator on every rank, each its slice of every global batch.
    loader = make_loader(
        train_ds,
        labels,
        nc,
        o.batch_size,
        train=True,
        balance=o.balance,
        seed=o.seed,
        pin_memory=device.type == "cuda",
        shard=(dist.rank(), dist.world()),
    )
    steps = len(loader) if o.max_steps_per_epoch is None else min(len(loader), o.max_steps_per_epoch)
    model.set_trainable(None)
    opt, sched = build_optimizer(
        model,
        len(model.groups),
        o.lr,
        o.lr_decay,
        o.weight_decay,
        total_steps=max(1, steps * cfg.epochs),
        warmup_steps=int(round(o.warmup_epochs * steps)),
    )
    terms = [ewc.EWCPenalty(state, model, lam)] if (lam > 0 and state is not None) else []
    engine = _engine(cfg, labels, nc, device, terms, ctx.hooks, ctx.progress)
    hist, records = FitHistory(), []
    best: dict[str, Any] = {}  # the best epoch's weights (keep = best)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731

    def step(epoch: int) -> tuple[int, float, dict[str, Any]]:
        st = engine.run_epoch(
            model, loader, opt, scheduler=sched, steps=o.max_steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}"
        )
        rec: dict[str, Any] = dict(hist.add(epoch, st), lam=lam)
        rec["new_val_accuracy"] = accuracy_of(evaluate_task(model, new, "val", classes)[0])
        rec["old_val_accuracy"] = mean_of([accuracy_of(evaluate_task(model, t, "val", classes)[0]) for t in olds])
        score = mean_of([rec["old_val_accuracy"], rec["new_val_accuracy"]])
        rec["score"] = score
        return epoch + 1, -float("inf") if score is None else score, rec

    def done(epoch: int, rec: dict[str, Any], improved: bool) -> None:
        if improved and cfg.keep == "best":
            best["sd"] = copy.deepcopy(model.state_dict())
        records.append(rec)
        echo(
            f"  [lambda {lam:g}] epoch {epoch + 1}/{cfg.epochs}: CE {rec['task_loss']:.4f} "
            f"penalty {rec['penalty']:.4f}  val new {fmt(rec['new_val_accuracy'])} "
            f"old {fmt(rec['old_val_accuracy'])}  ({rec['seconds']:.1f}s)"
        )

    sel = fit_epochs(range(cfg.epochs), step, done=done)
    model.eval()
    best_sd = best.get("sd")
    if records and best_sd is None:
        records[-1]["kept"] = True
    if best_sd is not None:
        model.load_state_dict(best_sd)
        records[sel.best_epoch - 1]["kept"] = True
        echo(f"  [lambda {lam:g}] kept epoch {sel.best_epoch} (best mean of old/new val accuracy)")
    return hist, records


def _before(model, new: TaskSet, olds: Sequence[TaskSet], classes: list[str]):
    new_before, _ = evaluate_task(model, new, "test", classes)
    old_before, old_logits = {}, {}
    for t in olds:
        old_before[t.name], old_logits[t.name] = evaluate_task(model, t, "test", classes)
    return new_before, old_before, old_logits


def _grow(
    model,
    classes: list[str],
    n_old: int,
    olds: Sequence[TaskSet],
    old_logits: Mapping[str, Any],
    cfg: ExtendConfig,
    echo: Callable[[str], None],
) -> tuple[dict[str, Any], list[Callable[[], None]]]:
    """Scenario (b): widen the head; the growth report and the after-step hooks it needs."""
    from training.heads import HeadRowFreeze

    head = model.grow_head(len(classes), seed=cfg.optim.seed)
    growth: dict[str, Any] = {"head": head, "old_classes": n_old, "new_classes": classes[n_old:]}
    for t in olds:
        if old_logits[t.name] is not None:
            _, after = evaluate_task(model, t, "test", classes)
            growth[f"old_logits_max_abs_change_at_growth[{t.name}]"] = float(
                (after[:, :n_old] - old_logits[t.name]).abs().max()
            )
    echo(f"head grown {n_old} -> {len(classes)} classes: + {growth['new_classes']}")
    return growth, [HeadRowFreeze(model, head, n_old)] if cfg.freeze_old_rows else []


def _search(ctx: _Context):
    """Train with each lambda from the same start (``training.lambda_search``, rule ``mean``)."""
    cfg = ctx.cfg
    from training import distributed as dist
    from training.engine import seed_everything
    from training.lambda_search import GridPoint, PickRule, search

    trained: dict[float, tuple[FitHistory, list[dict[str, Any]]]] = {}

    def train_point(lam: float) -> GridPoint:
        t0 = time.perf_counter()
        hist, records = _train_once(ctx, lam)
        trained[lam] = (hist, records)
        last: dict[str, Any] = next((r for r in records if r.get("kept")), {})  # the epoch whose weights were kept
        extra = {"penalty_share": hist.penalty_share, "train_s": time.perf_counter() - t0}
        return GridPoint(lam, last.get("old_val_accuracy"), last.get("new_val_accuracy"), extra)

    res = search(
        ctx.model,
        cfg.lambdas,
        train_point,
        PickRule("mean"),
        seed=lambda: seed_everything(cfg.optim.seed + dist.rank()),  # rank 0: the one-process stream
        echo=ctx.echo,
    )
    runs = [
        {
            "lambda": p.lam,
            "new_val_accuracy": p.new,
            "old_val_accuracy": p.old,
            "score": mean_of([p.old, p.new]),
            **p.extra,
        }
        for p in res.points
    ]
    hist, records = trained[res.lam]
    return res.lam, hist, records, runs


def _fold_fisher(model, state, new: TaskSet, cfg: ExtendConfig, backbone: str, classes, progress: bool):
    """Online EWC: this task's Fisher folded into the state, for the next extension."""
    from training import ewc, ewc_state

    n = min(cfg.fisher_samples, len(new.samples["train"]))
    f_new = ewc.estimate_fisher(
        model,
        new.loader("train", cfg.optim.batch_size, shuffle=True, seed=cfg.optim.seed),
        n_samples=n,
        draws=cfg.fisher_draws,
        seed=cfg.optim.seed,
        progress=progress,
    )
    record = ewc_state.TaskRecord(
        new.name, n, "sampled", cfg.fisher_draws, tuple(new.classes[c] for c in new.present_classes())
    )
    return ewc.consolidate(state, model, f_new, task=record, backbone=backbone, classes=classes, gamma=cfg.gamma)


def _check_inputs(
    classes: list[str], old_classes: list[str], olds: Sequence[TaskSet], state, cfg: ExtendConfig
) -> None:
    from training.ewc_state import EWCError

    if classes[: len(old_classes)] != old_classes:
        raise ValueError(f"extended classes {classes} must start with the model's classes {old_classes}")
    if cfg.method == "ewc" and state is None:
        raise EWCError("method 'ewc' needs the source model's Fisher/anchor state")
    if cfg.lam == "auto" and not any(t.samples["val"] for t in olds):
        raise DataError(
            "--lambda auto scores candidates on old-task validation data; none is available "
            "(give --old-data, or a fixed --lambda)"
        )


def _after(
    model,
    new: TaskSet,
    olds: Sequence[TaskSet],
    classes: list[str],
    n_old: int,
    old_logits_before: Mapping[str, Any],
    grown: bool,
):
    """Test metrics after training; with a grown head, how the old-class logits moved."""
    import torch

    new_after, _ = evaluate_task(model, new, "test", classes)
    old_after, old_logits = {}, {}
    for t in olds:
        old_after[t.name], logits = evaluate_task(model, t, "test", classes)
        if grown and logits is not None:
            old_logits[t.name] = old_logit_report(old_logits_before[t.name], logits, n_old)
            old_logits[t.name]["old_accuracy_within_old_classes"] = accuracy(
                logits, torch.tensor(t.labels("test")), range(n_old)
            )
    return new_after, old_after, old_logits


def _training_data(
    new: TaskSet,
    olds: Sequence[TaskSet],
    cfg: ExtendConfig,
    classes: list[str],
    progress: bool,
    echo: Callable[[str], None],
):
    """The new task's augmenting train split, mixed with the replay buffer when ``cfg.replay``."""
    from training.replay import mix_tasks

    train_ds, train_labels, replay_info = new.dataset("train", train=True, progress=progress), new.labels("train"), None
    if cfg.replay:
        try:
            train_ds, train_labels, replay_info = mix_tasks(
                train_ds, train_labels, olds, cfg.replay, share=cfg.replay_share, seed=cfg.optim.seed, classes=classes
            )
        except ValueError as exc:
            raise DataError(str(exc)) from None
        echo(
            f"replay buffer: {replay_info['size']} old exemplars {replay_info['per_class']}, "
            f"x{replay_info['repeats_per_epoch']} per epoch"
        )
    return train_ds, train_labels, replay_info


def extend_model(
    model,
    old_classes: Sequence[str],
    new: TaskSet,
    olds: Sequence[TaskSet],
    state,
    cfg: ExtendConfig,
    *,
    backbone: str,
    device=None,
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> Outcome:
    """Fine-tune ``model`` (a ``training.backbones.Classifier``, in place) on ``new``; no disk I/O.

    ``new``/``olds`` are labelled in the extended class list ``new.classes`` (the old
    classes first). ``state`` is the source model's :class:`training.ewc.EWCState`
    (required for ``method="ewc"``; used to fold the new Fisher into for online EWC).
    """
    import torch

    from training.engine import device_of

    t_start = time.perf_counter()
    device = device or device_of(model)
    classes, old_classes = list(new.classes), list(old_classes)
    _check_inputs(classes, old_classes, olds, state, cfg)
    grown = len(classes) > len(old_classes)
    t0 = time.perf_counter()
    new_before, old_before, old_logits_before = _before(model, new, olds, classes)
    eval_s = time.perf_counter() - t0
    growth, hooks = _grow(model, classes, len(old_classes), olds, old_logits_before, cfg, echo) if grown else (None, [])

    train_ds, train_labels, replay_info = _training_data(new, olds, cfg, classes, progress, echo)
    if cfg.optim.channels_last:
        model.to(memory_format=torch.channels_last)
    ctx = _Context(model, train_ds, train_labels, state, cfg, device, classes, new, olds, hooks, progress, echo)
    lam, hist, records, runs = _search(ctx)

    t0 = time.perf_counter()
    new_after, old_after, old_logits = _after(model, new, olds, classes, len(old_classes), old_logits_before, grown)
    eval_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    new_state = _fold_fisher(model, state, new, cfg, backbone, classes, progress) if cfg.write_fisher else None
    fisher_s = time.perf_counter() - t0 if cfg.write_fisher else 0.0

    report = extension_report(
        cfg,
        lam,
        runs,
        hist,
        classes,
        grown,
        new,
        olds,
        (new_before, new_after),
        (old_before, old_after),
        growth,
        old_logits,
        replay_info,
        state,
    )
    report["timing_s"] = {
        "total": time.perf_counter() - t_start,
        "train": sum(r["train_s"] for r in runs),
        "eval": eval_s,
        "fisher": fisher_s,
    }
    return Outcome(model, classes, report, hist, records, new_state)
