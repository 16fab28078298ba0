"""The classifier run's batches: datasets, loaders, cached head features, sharded predictions,
the optimizer of a planned epoch and BatchNorm re-estimation (a part of ``Trainer``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from runtime.inference.preprocess import InputSpec
from training import distributed as dist
from training.classification.config import TrainConfig
from training.classification.data import Splits
from training.classification.features import split_features
from training.classification.loader import ImageDataset, make_loader
from training.classification.transforms import train_pipeline, val_pipeline
from training.classifier import Classifier
from training.engine import Engine
from training.schedule import EpochPlan, build_optimizer


class RunBatches:
    """What ``Trainer`` draws its batches and optimizers from; the attributes are set by ``Trainer``."""

    cfg: TrainConfig
    splits: Splits
    model: Classifier
    input: InputSpec
    device: torch.device
    world: int
    plan: list[EpochPlan]
    engine: Engine
    progress: bool
    echo: Callable[[str], None]
    run_dir: Path
    _feats: dict[str, tuple[torch.Tensor, torch.Tensor]]
    _datasets: dict[str, ImageDataset]

    def _steps_per_epoch(self, phase: str) -> int:
        n, b = len(self.splits.train), self.cfg.batch_size
        # make_loader drops a trailing batch of 1 (and, distributed, one too small for every rank)
        steps = dist.global_batches(n, b, self.world, drop_last=n > 1 and n % b == 1)
        if self.cfg.max_steps_per_epoch:
            steps = min(steps, self.cfg.max_steps_per_epoch)
        return max(1, steps)

    def _optimizer(self, p: EpochPlan, offset: int) -> Any:
        cfg = self.cfg
        steps = self._steps_per_epoch(p.phase)
        total = sum(1 for q in self.plan if q.phase == p.phase) * steps
        lr = cfg.head_lr if p.phase == "head" else cfg.lr
        return build_optimizer(
            self.model,
            p.n_trainable,
            lr,
            cfg.lr_decay,
            cfg.weight_decay,
            total_steps=total,
            warmup_steps=int(round(cfg.warmup_epochs * steps)),
            offset=offset,
        )

    def _features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._feats:
            self._feats[split] = split_features(
                self.cfg,
                self.model,
                self.splits,
                split,
                self.input,
                self.device,
                progress=self.progress,
                echo=self.echo,
            )
        return self._feats[split]

    def _adapt_bn(self) -> None:
        from training.classification.bn_stats import adapt_bn

        t, c = time.perf_counter(), self.cfg
        n = adapt_bn(
            self.model,
            self.splits.train,
            self.input,
            batch_size=c.batch_size,
            device=self.device,
            channels_last=c.channels_last,
            progress=self.progress,
        )
        self.echo(f"BN statistics re-estimated on {n} training images in {time.perf_counter() - t:.1f}s")

    def _dataset(self, split: str) -> ImageDataset:
        if split not in self._datasets:
            pipe = train_pipeline(self.input, self.cfg.augment) if split == "train" else val_pipeline(self.input)
            ds = ImageDataset(self.splits.split(split), pipe, cache=self.cfg.cache_images)
            ds.prefill(threads=max(1, torch.get_num_threads()), progress=self.progress)
            self._datasets[split] = ds
        return self._datasets[split]

    def _loader(self, split: str, epoch: int = 0):
        ds = self._dataset(split)
        cfg = self.cfg
        # Seeded per epoch, so a resumed run draws the same batches as an uninterrupted one.
        return make_loader(
            ds,
            ds.labels,
            len(self.splits.classes),
            cfg.batch_size if split == "train" else max(cfg.batch_size, 64),
            train=split == "train",
            balance=cfg.balance,
            seed=cfg.seed + epoch,
            workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
            shard=(dist.rank(), self.world),
        )

    def _predict(self, split: str, desc: str = "eval"):
        """Predictions on a split; distributed, each rank predicts a contiguous shard, then all gather."""
        ds = self._dataset(split)
        if not dist.active():
            return self.engine.predict(self.model, self._loader(split), desc=desc)
        from torch.utils.data import Subset

        lo, hi = dist.shard_bounds(len(ds), dist.rank(), self.world)
        loader = make_loader(
            Subset(ds, range(lo, hi)),
            ds.labels[lo:hi],
            len(self.splits.classes),
            max(self.cfg.batch_size, 64),
            train=False,
            pin_memory=self.device.type == "cuda",
        )
        return self.engine.predict(self.model, loader, desc=desc).gathered()
