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
from pathlib import Path
from typing import Any

import torch

from runtime.fsio import atomic_write_json
from training import distributed as dist
from training.checkpoint import MODEL_CARD
from training.detection.checkpoint import DetCard
from training.detection.config import DetTrainConfig, detector_spec
from training.detection.copy_paste import CopyPasteDataset
from training.detection.datasets import DetSplits
from training.detection.epochs import evaluate_model, fit, reload_best
from training.detection.loader import DetectionDataset
from training.detection.task import MONITOR, DetectionTask, build_model, load_data, plan_run
from training.detection.transforms import train_transform
from training.engine import Engine, setup_runtime
from training.run_dir import RunExistsError, prepare_run_dir

log = logging.getLogger(__name__)


def set_multiscale(model: torch.nn.Module, size: tuple[int, int], factors: Sequence[float]) -> tuple[int, ...]:
    """Training resizes each image's short side to one of ``factors`` x the input's (multiples of 32, at random,
    torchvision's ``min_size`` tuple); evaluation uses the last, the input's own. Returns the sizes."""
    base = min(size)
    sizes = sorted({max(32, int(round(base * f / 32)) * 32) for f in factors} - {base}) + [base]
    model.transform.min_size = tuple(sizes)  # type: ignore[union-attr]
    model.transform.max_size = int(max(size) * max(1.0, *factors))  # type: ignore[union-attr]
    return tuple(sizes)


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
        splits = load_data(self.cfg, self.echo)
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
        model = build_model(cfg, splits.classes).to(device)
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


__all__ = ["DetTrainer", "set_multiscale", "train_detector", "write_outputs"]
