"""The training loop: strategies, early stopping, best checkpoint, resume, run-directory outputs.

Under torchrun every rank runs this loop (``training.distributed``): rank 0 alone checks and
writes the run directory (its reads reach the others by broadcast), batches are slices of the
global batch, validation and test predictions are sharded and gathered, so each rank holds
the numbers a single process would compute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.fsio import atomic_write_json
from training import checkpoint as ckpt
from training import distributed as dist
from training.classification.config import TrainConfig
from training.classification.loader import ImageDataset, TensorPairs, class_weights, make_loader
from training.classification.outputs import RunOutputs
from training.classification.strategy import make_plan
from training.classification.task import ClassificationTask, build_model, input_spec, load_data
from training.classification.transforms import batch_mix
from training.ema import WeightEMA, maybe_applied
from training.engine import (
    SKIP,
    STOP,
    TRAIN,
    Engine,
    EpochSelector,
    fit_epochs,
    seed_everything,
    setup_runtime,
)
from training.metrics import monitor_name, monitor_value
from training.progress import run_eta
from training.run_dir import EpochInfo, LoopState, RunExistsError, RunResult, prepare_run_dir  # noqa: F401  (re-exported)
from training.schedule import EpochPlan

log = logging.getLogger(__name__)


class Trainer(RunOutputs):
    """One run: ``Trainer(cfg).fit()``. The strategies are described in training/classification/cli.py (TRAIN_EPILOG)."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        on_epoch_end: Callable[[EpochInfo], None] | None = None,
        echo: Callable[[str], None] | None = None,
        sync_bn: bool = False,
        log_every: int = 0,
    ) -> None:
        self.log_every = log_every  # no bar: a log line every N steps (training.progress)
        self.raw_cfg = cfg  # before resolving: what the planner may fill (--plan auto)
        self.cfg = cfg.resolved()
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.echo = echo or (lambda s: log.info(s))
        self.sync_bn = sync_bn  # a launch option (like the world size), not part of the config hash
        self.run_dir = Path(self.cfg.out)

    # -- setup --------------------------------------------------------------------------
    def _prepare_dir(self) -> dict | None:
        return prepare_run_dir(
            self.run_dir, self.cfg.to_dict(), self.cfg.hash(), resume=self.resume, overwrite=self.overwrite
        )

    def fit(self) -> RunResult:
        cfg = self.cfg
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        setup_runtime(cfg.threads, cfg.seed)
        self.device = dist.setup(cfg.device)
        self.world = dist.world()
        dist.per_rank_batch(cfg.batch_size, self.world)
        dist.check_sync_bn(self.sync_bn, self.device)
        self.echo, self.progress = dist.main_echo(self.echo), self.progress and dist.is_main()
        # Rank 0 checks and creates the run directory and reads last.pt; the others get its answer.
        if cfg.plan == "auto":  # the plan changes the config (and its hash): data first, then the run directory
            self._load_data()
            self._plan()
            cfg = self.cfg
        state = dist.on_main(self._prepare_dir)
        if cfg.plan != "auto":
            self._load_data()
        elif dist.is_main():
            atomic_write_json(self.run_dir / "plan.json", self.plan_record)
        self._build_model()
        history: list[dict[str, Any]] = []
        sel = EpochSelector()
        loop = LoopState(self.engine.scaler())
        if state is not None:
            history, start = self._restore(state, sel, loop)
        else:
            start = 0
            if cfg.bn == "adapt":  # a resumed run's statistics come with its weights
                self._adapt_bn()
        self._start, self._t_fit = start, time.perf_counter()  # the epoch lines' ETA

        last_phase = [self.plan[start - 1].phase if start > 0 else None]

        def gate(p: EpochPlan, sel: EpochSelector) -> str:
            if last_phase[0] is not None and p.phase != last_phase[0]:
                sel.bad_epochs = 0  # fine-tuning gets its own patience after the head warm-up
            last_phase[0] = p.phase
            if sel.exhausted(cfg.patience):
                if p.phase == "head" and self.plan[-1].phase == "finetune":
                    return SKIP  # stop warming up the head; fine-tuning still runs
                self.echo(f"early stop: no {self.monitor} improvement for {cfg.patience} epochs")
                return STOP
            return TRAIN

        def done(p: EpochPlan, record: dict[str, Any], improved: bool) -> None:
            self._kept(p, record, improved, sel)
            history.append(record)
            rngs = dist.all_gather_objects(ckpt.rng_state())  # each rank's augmentation stream
            if dist.is_main():
                self._save_epoch(p, loop, sel, history, rngs)
            if self.on_epoch_end is not None:
                self.on_epoch_end(EpochInfo(p, self.model, loop.opt, record))

        fit_epochs(self.plan[start:], lambda p: self._epoch(p, loop), selector=sel, gate=gate, done=done)

        report = self._finish(history, sel.best_epoch, time.perf_counter() - t_wall, time.process_time() - t_cpu)
        return RunResult(self.run_dir, history, sel.best_epoch, sel.best_value, self.monitor, report)

    def _save_epoch(self, p: EpochPlan, loop: LoopState, sel: EpochSelector, history: list, rngs: list) -> None:
        """metrics.json and last.pt (rank 0)."""
        cfg = self.cfg
        atomic_write_json(self.run_dir / "metrics.json", history)
        ckpt.save_resume(
            self.run_dir,
            {
                "model": self.model.state_dict(),
                "optimizer": loop.opt.state_dict(),
                "scheduler": loop.sched.state_dict(),
                "scaler": loop.scaler.state_dict(),
                "epoch": p.epoch,
                "signature": list(p.signature),
                "sched_offset": loop.sched_offset,
                "best_value": sel.best_value,
                "best_epoch": sel.best_epoch,
                "bad_epochs": sel.bad_epochs,
                "history": history,
                "rng": rngs[0],
                "rng_ranks": rngs,  # one per rank; a resume with the same world size restores its own
                "world": self.world,
                "config_hash": cfg.hash(),
            },
        )

    def _load_data(self) -> None:
        self.splits = splits = load_data(self.cfg, self.echo)
        if not splits.val:
            raise ValueError("the validation split is empty; give a val split or a val_fraction > 0")
        from training.plan import classification_fingerprint, small_data_warnings

        names = [splits.classes[smp.label] for smp in splits.train]
        if names:
            fp = classification_fingerprint([(1, 1)] * len(names), names)  # counts only: sizes are not read here
            for w in small_data_warnings(fp, "images"):
                self.echo(f"warning: {w}")
        self.echo(
            f"data: {len(splits.classes)} classes {splits.classes}; train/val/test = "
            f"{len(splits.train)}/{len(splits.val)}/{len(splits.test)}"
        )

    def _plan(self) -> None:
        """Fill the unset image_size / epochs from the training images (training.plan); plan.json in the run."""
        from PIL import Image

        from training.plan import classification_fingerprint, plan_classification

        sizes, names = [], []
        for smp in self.splits.train:
            with Image.open(smp.path) as im:  # header only
                sizes.append((im.height, im.width))
            names.append(self.splits.classes[smp.label])
        plan = plan_classification(classification_fingerprint(sizes, names))
        raw, kw = self.raw_cfg, {}
        for key in ("image_size", "epochs"):
            if getattr(raw, key) is None:
                kw[key] = plan.choices[key]
        self.cfg = replace(raw, **kw).resolved()
        for line in plan.lines(list(kw)):
            self.echo(line)
        self.plan_record = {**plan.to_dict(), "applied": list(kw)}

    def _build_model(self) -> None:
        cfg, nc = self.cfg, len(self.splits.classes)
        self.input = input_spec(cfg)
        model = build_model(cfg, self.splits.classes)
        self.model = model = dist.convert_sync_bn(model, self.sync_bn).to(self.device)
        if dist.active():  # rank 0 keeps the one-process stream; the others augment differently
            seed_everything(cfg.seed + dist.rank())
        model.freeze_bn_stats = cfg.bn in ("frozen", "adapt")
        if cfg.channels_last:
            # NHWC convolutions: faster on CUDA and, measured here, ~1.6x on CPU (lite0 training).
            model.to(memory_format=torch.channels_last)
        self.plan = make_plan(cfg, len(model.groups))
        if not self.plan:
            raise ValueError("nothing to train: epochs and head_epochs are both 0")
        self.monitor = monitor_name(cfg.monitor, nc)
        train_labels = np.array([s.label for s in self.splits.train], dtype=np.int64)
        cw = class_weights(train_labels, nc).to(self.device) if cfg.balance == "loss" else None
        task = ClassificationTask(torch.nn.CrossEntropyLoss(weight=cw, label_smoothing=cfg.label_smoothing))
        mixed = ClassificationTask(task.criterion, mix=batch_mix(cfg.augment, nc))  # fine-tuning batches only
        self.hooks = mixed  # the engine's step and eval part (evaluate does not mix)
        self.ema = WeightEMA(model, cfg.ema) if cfg.ema else None  # first updated by the first fine-tuning step
        self.engine = Engine(
            task=mixed,
            after_step=(self.ema.update,) if self.ema else (),
            device=self.device,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
            grad_clip=cfg.grad_clip,
            bn_frozen=model.freeze_bn_stats,
            progress=self.progress,
            log=self.echo,
            log_every=self.log_every,
        )
        # The head warm-up runs on cached features: no AMP, no NHWC, no BatchNorm.
        self.head_engine = Engine(
            task=task,
            device=self.device,
            grad_clip=cfg.grad_clip,
            progress=self.progress,
            log=self.echo,
            log_every=self.log_every,
        )
        self._feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._datasets: dict[str, ImageDataset] = {}

    def _restore(self, state: dict, sel: EpochSelector, loop: LoopState) -> tuple[list[dict[str, Any]], int]:
        """Weights, RNG, history and (within the same phase) optimizer state of ``last.pt``."""
        self.model.load_state_dict(state["model"])
        rngs = state.get("rng_ranks") or [state["rng"]]
        ckpt.set_rng_state(rngs[dist.rank()] if len(rngs) == self.world else state["rng"])
        sel.best_value, sel.best_epoch, sel.bad_epochs = state["best_value"], state["best_epoch"], state["bad_epochs"]
        start = state["epoch"] + 1
        if start < len(self.plan) and tuple(state["signature"]) == self.plan[start].signature:
            loop.sig = self.plan[start].signature
            loop.sched_offset = state["sched_offset"]
            self.model.set_trainable(loop.sig[1])
            loop.opt, loop.sched = self._optimizer(self.plan[start], loop.sched_offset)
            loop.opt.load_state_dict(state["optimizer"])
            loop.sched.load_state_dict(state["scheduler"])
            if "scaler" in state:
                loop.scaler.load_state_dict(state["scaler"])
        self.echo(f"resuming {self.run_dir} at epoch {start + 1}/{len(self.plan)}")
        return list(state["history"]), start

    def _epoch(self, p: EpochPlan, loop: LoopState) -> tuple[int, float, dict[str, Any]]:
        """Train one planned epoch and validate: ``(1-based epoch, monitor value, record)``."""
        model = self.model
        if p.signature != loop.sig:
            loop.sig = p.signature
            model.set_trainable(p.n_trainable)
            loop.sched_offset = p.phase_epoch * self._steps_per_epoch(p.phase)
            loop.opt, loop.sched = self._optimizer(p, loop.sched_offset)
        ep_wall, ep_cpu = time.perf_counter(), time.process_time()
        if p.phase == "head":
            feats, labels = self._features("train")
            batches = make_loader(
                TensorPairs(feats, labels),
                labels.numpy(),
                len(self.splits.classes),
                self.cfg.batch_size,
                train=True,
                balance=self.cfg.balance,
                seed=self.cfg.seed + p.epoch,
                shard=(dist.rank(), self.world),
            )
            stats = self.head_engine.run_epoch(
                model.head,
                batches,
                loop.opt,
                scheduler=loop.sched,
                steps=self.cfg.max_steps_per_epoch,
                desc=f"head {p.epoch + 1}",
            )
            preds = self.head_engine.predict(model.head, [self._features("val")])
        else:
            stats = self.engine.run_epoch(
                model,
                self._loader("train", p.epoch),
                loop.opt,
                scheduler=loop.sched,
                scaler=loop.scaler,
                steps=self._steps_per_epoch("finetune"),
                desc=f"epoch {p.epoch + 1}/{len(self.plan)}",
            )
            with maybe_applied(self.ema):
                preds = self._predict("val")
        val = self.hooks.evaluate(preds, self.splits.classes)
        value = monitor_value(val, self.monitor)
        record = {
            "epoch": p.epoch + 1,
            "phase": p.phase,
            "trainable": [g.name for g in model.groups if g.name not in model.frozen],
            "train_loss": stats.loss,
            "lr": loop.opt.param_groups[0]["lr"],
            "val": {k: v for k, v in val.items() if k not in ("per_class",)},
            "monitor": self.monitor,
            "improved": False,  # set by _kept once the selector has seen the epoch
            "wall_s": time.perf_counter() - ep_wall,
            "train_s": stats.seconds,  # the training pass alone (bench/bench_ddp.py: images/s)
            "cpu_s": time.process_time() - ep_cpu,
        }
        return p.epoch + 1, value, record

    def _kept(self, p: EpochPlan, record: dict[str, Any], improved: bool, sel: EpochSelector) -> None:
        """The best epoch's weights saved (rank 0); the epoch's log line."""
        record["improved"] = improved
        if improved and dist.is_main():
            with maybe_applied(self.ema):
                card = self._card({"val": record["val"], "best_epoch": sel.best_epoch})
                ckpt.save_model(self.run_dir, self.model, card)
        value = monitor_value(record["val"], self.monitor)
        self.echo(
            f"epoch {p.epoch + 1}/{len(self.plan)} [{p.phase}, {len(record['trainable'])} groups] "
            f"loss {record['train_loss']:.4f} val {self.monitor} {value:.4f} acc {record['val']['accuracy']:.4f}"
            f"{'  *' if improved else ''}  ({record['wall_s']:.1f}s)"
            f"{run_eta(p.epoch + 1 - self._start, len(self.plan) - self._start, time.perf_counter() - self._t_fit)}"
        )


def train(cfg: TrainConfig, **kw) -> RunResult:
    """Run one training configuration (see :class:`Trainer`)."""
    return Trainer(cfg, **kw).fit()
