"""The detector's epochs: ``fit`` hands ``training.engine.fit_epochs`` its step, gate and done hooks
(``Engine.run_epoch`` with ``DetectionTask``, val mAP@.5 per epoch, best weights and ``last.pt``
kept); train and extend both run it. Also the loader, optimizer and evaluation it uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.fsio import atomic_write_json
from training import checkpoint as ckpt
from training import distributed as dist
from training.checkpoint import BEST
from training.detection.checkpoint import DetCard, save_detector
from training.detection.config import DetTrainConfig
from training.detection.loader import DetectionDataset, collate
from training.detection.model import set_trunk_trainable, spec_of, trunk_stages
from training.detection.predict import predict
from training.detection.task import MONITOR, DetectionTask, DetPredictions, monitor_value
from training.ema import WeightEMA, maybe_applied
from training.engine import STOP, TRAIN, Engine, EpochSelector, fit_epochs
from training.progress import run_eta
from training.schedule import warmup_cosine


@dataclass
class DetFit:
    """The outcome of ``fit``: per-epoch records, the best epoch and its val mAP@.5."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_value: float = float("-inf")


def make_loader(ds: DetectionDataset, batch_size: int, seed: int, shuffle: bool = True) -> torch.utils.data.DataLoader:
    # Seeded per epoch: a rerun draws the same batches. Distributed: ``batch_size`` is global and
    # each rank takes its slice of every global batch of the one-process order.
    g = torch.Generator().manual_seed(seed)
    if dist.active():
        base = torch.utils.data.RandomSampler(ds, generator=g) if shuffle else range(len(ds))
        batches = dist.ShardedBatchSampler(base, batch_size, dist.rank(), dist.world(), generator=g, seed=seed)  # type: ignore[arg-type]
        return torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate, generator=g)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=g)


def steps_per_epoch(n: int, cfg: DetTrainConfig) -> int:
    steps = max(1, dist.global_batches(n, cfg.batch_size, dist.world(), drop_last=False))
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def build_optimizer(model: torch.nn.Module, cfg: DetTrainConfig, total_steps: int, steps: int) -> tuple[Any, Any]:
    """SGD (momentum 0.9) or AdamW over trainable parameters; no decay on biases and norms; warm-up + cosine."""
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (plain if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    f = warmup_cosine(total_steps, int(round(cfg.warmup_epochs * steps)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)


def evaluate_model(
    model: torch.nn.Module,
    ds: DetectionDataset,
    task: DetectionTask,
    classes: Sequence[str],
    views: Sequence[str] = ("original",),
) -> tuple[dict[str, Any], list]:
    """COCO + part-level metrics of ``model`` on ``ds`` (boxes in original pixels); also the predictions.

    Distributed: each rank predicts a contiguous shard, the shards are gathered in rank order.
    """
    if dist.active():
        import copy

        lo, hi = dist.shard_bounds(len(ds), dist.rank(), dist.world())
        shard = copy.copy(ds)
        shard.samples = ds.samples[lo:hi]
        preds = [p for part in dist.all_gather_objects(predict(model, shard, views)) for p in part]
    else:
        preds = predict(model, ds, views)
    return task.evaluate(DetPredictions(ds.samples, preds), classes), preds


def fit(
    model: torch.nn.Module,
    engine: Engine,
    cfg: DetTrainConfig,
    train_ds: DetectionDataset,
    val_ds: DetectionDataset,
    classes: Sequence[str],
    run_dir: Path,
    card: DetCard,
    echo: Callable[[str], None],
    epoch_extra: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    resume: dict[str, Any] | None = None,
    keep_last: bool = False,
) -> DetFit:
    """Epochs through ``engine``; best val mAP@.5 saved to ``run_dir/best.safetensors`` + model.json.

    ``keep_last``: ``last.pt`` after every epoch (weights, optimizer, schedule, RNG, history, selector);
    ``resume``: such a state, training continues at the epoch after it (EMA restarts from its weights)."""
    task: DetectionTask = engine.task  # type: ignore[assignment]
    steps = steps_per_epoch(len(train_ds), cfg)
    opt, sched = build_optimizer(model, cfg, cfg.epochs * steps, steps)  # every parameter that will train
    out = DetFit()
    t_fit = time.perf_counter()
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    if ema is not None:
        engine.after_step = (*engine.after_step, ema.update)
    spec = spec_of(model)
    n_stages = trunk_stages(model)
    target = n_stages if spec.trainable_stages is None else min(spec.trainable_stages, n_stages)

    sel = EpochSelector()
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        rngs = resume.get("rng_ranks") or [resume["rng"]]
        ckpt.set_rng_state(rngs[dist.rank()] if len(rngs) == dist.world() else resume["rng"])
        sel.best_value, sel.best_epoch, sel.bad_epochs = (
            resume["best_value"],
            resume["best_epoch"],
            resume["bad_epochs"],
        )
        out.history = list(resume["history"])
        start = int(resume["epoch"]) + 1
        echo(f"resuming {run_dir} at epoch {start + 1}/{cfg.epochs}")

    def unfreeze(epoch: int) -> int:
        """Gradual unfreezing: trunk frozen for cfg.freeze_trunk_epochs, then one more stage (from the top) per
        epoch up to the spec's trainable_stages; returns the trainable stage count."""
        n = min(target, max(0, epoch - cfg.freeze_trunk_epochs + 1))
        set_trunk_trainable(model, n)
        return n

    def gate(epoch: int, sel: EpochSelector) -> str:
        if cfg.patience and sel.exhausted(cfg.patience):
            echo(f"early stop: no val {MONITOR} gain for {cfg.patience} epochs")
            return STOP
        return TRAIN

    def step(epoch: int) -> tuple[int, float, dict[str, Any]]:
        t0 = time.perf_counter()
        trainable_now = unfreeze(epoch) if cfg.freeze_trunk_epochs else target
        stats = engine.run_epoch(
            model,
            make_loader(train_ds, cfg.batch_size, cfg.seed + epoch),
            opt,
            scheduler=sched,
            steps=steps,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
        )
        with maybe_applied(ema):
            val, _ = evaluate_model(model, val_ds, task, classes)
        record = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "loss_parts": {k: sum(v) / len(v) for k, v in stats.parts.items() if v},
            "terms": {k: sum(v) / len(v) for k, v in stats.terms.items() if v},
            "lr": opt.param_groups[0]["lr"],
            "val": {k: v for k, v in val.items() if k != "per_class"},
            "monitor": MONITOR,
            "improved": False,
            "wall_s": time.perf_counter() - t0,
        }
        if cfg.freeze_trunk_epochs:
            record["trunk_trainable_stages"] = trainable_now
        return epoch + 1, monitor_value(val), record

    def done(epoch: int, record: dict[str, Any], improved: bool) -> None:
        record["improved"] = improved
        val, value = record["val"], monitor_value(record["val"])
        if epoch_extra is not None:
            record.update(epoch_extra(model))
        out.history.append(record)
        if dist.is_main():
            atomic_write_json(run_dir / "metrics.json", out.history)
        rngs = dist.all_gather_objects(ckpt.rng_state()) if keep_last else []
        if improved and dist.is_main():
            with maybe_applied(ema):
                save_detector(
                    run_dir,
                    model,
                    DetCard(
                        spec_of(model),
                        card.data,
                        config_hash=card.config_hash,
                        metrics={"best_epoch": epoch + 1, "val": record["val"]},
                        parent=card.parent,
                        plan=card.plan,
                    ),
                )
        if keep_last and dist.is_main():  # after best.safetensors: a resume never lacks the best weights
            ckpt.save_resume(
                run_dir,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "epoch": epoch,
                    "history": out.history,
                    "best_value": sel.best_value,
                    "best_epoch": sel.best_epoch,
                    "bad_epochs": sel.bad_epochs,
                    "rng": rngs[0],
                    "rng_ranks": rngs,
                    "config_hash": card.config_hash,
                },
            )
        echo(
            f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} val {MONITOR} {value:.4f} "
            f"mAP {val['map'] if val['map'] is not None else float('nan'):.4f}{'  *' if improved else ''}"
            f"  ({record['wall_s']:.1f}s){run_eta(epoch + 1 - start, cfg.epochs - start, time.perf_counter() - t_fit)}"
        )

    sel = fit_epochs(range(start, cfg.epochs), step, selector=sel, gate=gate, done=done)
    out.best_epoch, out.best_value = sel.best_epoch, sel.best_value
    return out


def reload_best(model: torch.nn.Module, run_dir: Path) -> None:
    """The best weights rank 0 wrote, broadcast to every rank (no shared disk needed)."""
    from safetensors.torch import load_file

    model.load_state_dict(dist.on_main(lambda: load_file(str(run_dir / BEST))))


__all__ = ["DetFit", "build_optimizer", "evaluate_model", "fit", "make_loader", "reload_best", "steps_per_epoch"]
