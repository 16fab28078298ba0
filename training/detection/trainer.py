"""``defectscope train`` on detection data: a Faster R-CNN run on the one training engine.

The epochs run through ``training.engine.Engine.run_epoch`` with ``DetectionTask`` as the
task part (extend adds its EWC term and row-freezing hook the same way). Run directory:
``config.json`` (resolved), ``metrics.json`` (per epoch), ``best.safetensors`` + ``model.json``
(best val mAP@.5), ``report.json`` (held-out COCO + part-level metrics), ``curves.png``,
``pr_curves.png``, ``panels.png`` (predicted vs truth).

Under torchrun (``training.distributed``) each rank steps on its slice of every global batch
(``--batch-size`` is global), predictions for evaluation are sharded and gathered, and rank 0
alone writes the run directory. torchvision's detection losses sample anchors and proposals
per image batch, so a 2-rank run is the same optimisation as one process, not bit-equal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.fsio import atomic_write_json
from training import checkpoint as ckpt
from training import distributed as dist
from training.checkpoint import BEST, MODEL_CARD
from training.detection.checkpoint import DetCard, save_detector
from training.detection.config import DetTrainConfig, detector_spec
from training.detection.copy_paste import CopyPasteDataset
from training.detection.datasets import DetSplits, resolve_detection
from training.detection.loader import DetectionDataset, collate
from training.detection.model import build_detector, set_trunk_trainable, spec_of, trunk_stages
from training.detection.planning import plan_run
from training.detection.predict import predict
from training.detection.task import MONITOR, DetectionTask, DetPredictions, monitor_value
from training.detection.transforms import train_transform
from training.ema import WeightEMA, maybe_applied
from training.engine import STOP, TRAIN, Engine, EpochSelector, fit_epochs, seed_everything, setup_runtime
from training.progress import run_eta
from training.run_dir import RunExistsError, prepare_run_dir
from training.schedule import warmup_cosine

log = logging.getLogger(__name__)


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


def set_multiscale(model: torch.nn.Module, size: tuple[int, int], factors: Sequence[float]) -> tuple[int, ...]:
    """Training resizes each image's short side to one of ``factors`` x the input's (multiples of 32, at random,
    torchvision's ``min_size`` tuple); evaluation uses the last, the input's own. Returns the sizes."""
    base = min(size)
    sizes = sorted({max(32, int(round(base * f / 32)) * 32) for f in factors} - {base}) + [base]
    model.transform.min_size = tuple(sizes)  # type: ignore[union-attr]
    model.transform.max_size = int(max(size) * max(1.0, *factors))  # type: ignore[union-attr]
    return tuple(sizes)


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


def write_outputs(
    run_dir: Path,
    model: torch.nn.Module,
    ds: DetectionDataset,
    task: DetectionTask,
    classes: Sequence[str],
    split: str,
    history: Sequence[dict[str, Any]],
    panels: int,
) -> dict[str, Any]:
    """Held-out metrics of the loaded model + the run's PNGs (rank 0); returns the metrics."""
    from training.detection.coco_eval import pr_curves
    from training.detection.plots import plot_det_curves, plot_panels, plot_pr

    m, preds = evaluate_model(model, ds, task, classes)
    if not dist.is_main():
        return m
    if history:
        plot_det_curves(history, run_dir / "curves.png")
    plot_pr(
        pr_curves(ds.samples, preds, classes),
        {c: v["ap50"] for c, v in m["per_class"].items()},
        run_dir / "pr_curves.png",
        title=f"{split} split: precision-recall at IoU 0.5",
    )
    if panels:
        plot_panels(ds.samples, preds, classes, run_dir / "panels.png", task.score_threshold, panels)
    return m


class DetTrainer:
    """One detector run: ``DetTrainer(cfg).fit() -> report``."""

    def __init__(
        self,
        cfg: DetTrainConfig,
        *,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = False,
        echo: Callable[[str], None] | None = None,
        log_every: int = 0,
    ) -> None:
        self.cfg, self.overwrite, self.resume, self.progress = cfg, overwrite, resume, progress
        self.log_every = log_every  # no bar: a log line every N steps (training.progress)
        self.echo = (echo or log.info) if dist.DistEnv.from_env().rank == 0 else (lambda _s: None)
        self.run_dir = Path(cfg.out)

    def _prepare_dir(self) -> dict[str, Any] | None:
        """The run directory checked (resume: same config hash) and config.json written; the resume state."""
        if not self.resume and (self.run_dir / MODEL_CARD).exists() and not self.overwrite:
            raise RunExistsError(
                f"{self.run_dir}: holds a run already; pass --resume to continue it, --overwrite to replace it, "
                "or another --out"
            )
        return prepare_run_dir(
            self.run_dir, self.cfg.to_dict(), self.cfg.hash(), resume=self.resume, overwrite=self.overwrite
        )

    def _write_config(self) -> None:
        atomic_write_json(self.run_dir / "config.json", {**self.cfg.to_dict(), "config_hash": self.cfg.hash()})

    def load_data(self) -> DetSplits:
        splits = resolve_detection(self.cfg.data)
        counts = splits.report.counts()
        if counts:
            self.echo(f"bad annotations skipped: {counts} (first: {splits.report.problems[0]})")
        if not splits.val:
            raise ValueError("the validation split is empty; give val.json / a val folder or val_fraction > 0")
        self.echo(
            f"data ({splits.format}): {len(splits.classes)} classes {splits.classes}; train/val/test = "
            f"{len(splits.train)}/{len(splits.val)}/{len(splits.test)}"
        )
        return splits

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        setup_runtime(cfg.threads, cfg.seed)
        device = dist.setup(cfg.device)
        dist.per_rank_batch(cfg.batch_size, dist.world())
        self.progress = self.progress and dist.is_main()
        state = dist.on_main(self._prepare_dir)
        splits = self.load_data()
        cfg, plan = plan_run(cfg, splits.train, splits.classes, self.echo)
        if plan is not None:
            self.cfg = cfg
            dist.on_main(self._write_config)
            dist.per_rank_batch(cfg.batch_size, dist.world())
        spec = detector_spec(splits.classes, cfg.model)
        seed_everything(cfg.seed)
        model = build_detector(spec).to(device)
        h, w = spec.image_size
        tf = train_transform(cfg.augment, square=h == w)
        train_ds = (
            CopyPasteDataset(splits.train, spec.image_size, tf, cfg.augment.copy_paste)
            if cfg.augment.copy_paste
            else DetectionDataset(splits.train, spec.image_size, tf)
        )
        if cfg.augment.multiscale:
            set_multiscale(model, spec.image_size, cfg.augment.multiscale)
        val_ds = DetectionDataset(splits.val, spec.image_size)
        task = DetectionTask(cfg.score_threshold)
        engine = Engine(
            task=task,
            device=device,
            amp=cfg.amp,
            grad_clip=cfg.grad_clip,
            progress=self.progress,
            log=self.echo,
            log_every=self.log_every,
        )
        card = DetCard(spec, cfg.data.to_dict(), config_hash=cfg.hash(), plan=plan)
        result = fit(
            model,
            engine,
            cfg,
            train_ds,
            val_ds,
            splits.classes,
            self.run_dir,
            card,
            self.echo,
            resume=state,
            keep_last=True,
        )
        reload_best(model, self.run_dir)
        split = "test" if splits.test else "val"
        ds = val_ds if split == "val" else DetectionDataset(splits.test, spec.image_size)
        m = write_outputs(self.run_dir, model, ds, task, splits.classes, split, result.history, cfg.panels)
        report = {
            "task": "detection",
            "split": split,
            **m,
            "classes": splits.classes,
            "best_epoch": result.best_epoch,
            "monitor": MONITOR,
            "best_val": result.best_value,
            "epochs_run": len(result.history),
            "wall_s": time.perf_counter() - t0,
            "data": splits.summary(),
            "config_hash": cfg.hash(),
            "distributed": {"world_size": dist.world()},
            **({"plan": plan} if plan else {}),
        }
        if dist.is_main():
            atomic_write_json(self.run_dir / "report.json", report)
        self.echo(
            f"{split}: mAP@[.5:.95] {_f(m['map'])}  mAP@.5 {_f(m['map50'])}  part recall "
            f"{_f(m['part']['recall'])}  false alarms {_f(m['part']['false_alarm_rate'])} -> {self.run_dir}"
        )
        return report


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def train_detector(cfg: DetTrainConfig, **kw: Any) -> dict[str, Any]:
    return DetTrainer(cfg, **kw).fit()


__all__ = ["DetFit", "DetTrainer", "build_optimizer", "evaluate_model", "fit", "make_loader", "train_detector"]
