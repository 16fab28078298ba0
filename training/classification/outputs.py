"""The classifier run's outputs: the best weights reloaded and evaluated on test (or val), then
report.json, the model card and the plots (a part of ``Trainer``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.inference.preprocess import InputSpec
from training import checkpoint as ckpt
from training import distributed as dist
from training.classification.batches import RunBatches
from training.classification.config import TrainConfig
from training.classification.data import Splits
from training.classification.task import ClassificationTask
from training.classifier import Classifier
from training.engine import Engine
from training.metrics import write_final


class RunOutputs(RunBatches):
    """The end of a ``Trainer`` run; the attributes are set by ``Trainer``."""

    cfg: TrainConfig
    splits: Splits
    model: Classifier
    input: InputSpec
    head_engine: Engine
    hooks: ClassificationTask
    monitor: str
    sync_bn: bool
    echo: Callable[[str], None]
    run_dir: Path

    def _card(self, metrics: dict) -> ckpt.ModelCard:
        s = self.splits
        return ckpt.ModelCard(
            backbone=self.cfg.backbone,
            num_classes=len(s.classes),
            classes=tuple(s.classes),
            good_classes=tuple(s.good_classes),
            input=self.input,
            weights=self.cfg.weights,
            data=self.cfg.data.to_dict(),
            dataset_fingerprint=s.fingerprint,
            config_hash=self.cfg.hash(),
            metrics=metrics,
        )

    def _finish(self, history: list[dict], best_epoch: int, wall: float, cpu: float) -> dict[str, Any]:
        """Reload the best weights, evaluate on test (or val), write report/plots/model card."""
        from safetensors.torch import load_file

        model, s = self.model, self.splits
        if best_epoch > 0:  # rank 0 wrote it; the others get it by broadcast (no shared disk needed)
            weights = dist.on_main(lambda: load_file(str(self.run_dir / ckpt.BEST)))
            model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        split = "test" if s.test else "val"
        if self.cfg.strategy == "linear-probe":
            preds = self.head_engine.predict(model.head, [self._features(split)])
        else:
            preds = self._predict(split, desc=f"eval {split}")
        m = self.hooks.evaluate(preds, s.classes)
        best = next((h for h in history if h["epoch"] == best_epoch), {})
        report = {
            "split": split,
            **m,
            "classes": s.classes,
            "good_classes": s.good_classes,
            "best_epoch": best_epoch,
            "monitor": self.monitor,
            "best_val": best.get("val", {}),
            "epochs_run": len(history),
            "wall_s": wall,
            "cpu_s": cpu,
            "data": s.summary(),
            "config_hash": self.cfg.hash(),
            "distributed": {"world_size": self.world, "sync_bn": self.sync_bn and dist.active()},
        }
        if dist.is_main():
            self._write_outputs(report, history, best, m, split, wall, cpu)
        return report

    def _write_outputs(
        self, report: dict, history: list, best: dict, m: dict, split: str, wall: float, cpu: float
    ) -> None:
        """report.json, model card, plots (rank 0)."""
        keep = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auroc")
        val = {k: best.get("val", {}).get(k) for k in keep}
        card = self._card({"best_epoch": report["best_epoch"], "val": val, split: {k: m.get(k) for k in keep}})
        write_final(self.run_dir, report, card, history, self.monitor, f"{self.cfg.backbone} — {split}")
        self.echo(
            f"{split}: accuracy {m.get('accuracy', float('nan')):.4f}  balanced "
            f"{m.get('balanced_accuracy', float('nan')):.4f}  macro-F1 {m.get('macro_f1', float('nan')):.4f}"
            f"  AUROC {m['auroc'] if m.get('auroc') is not None else 'n/a'}  "
            f"({wall:.0f}s wall, {cpu:.0f}s CPU) -> {self.run_dir}"
        )
