"""Detector ``extend --lambda auto``: one short run per lambda of the grid from the same start,
scored on old-line and new-line val mAP@.5 and picked by ``training.lambda_search`` (the search
the classifier's extend runs too); ``training.detection.extend`` then runs the full budget at the
chosen lambda, or keeps the chosen point when the points already ran it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.lambda_search import GridPoint, PickRule, SearchResult, search


def val_map50(
    model: Any, samples: Sequence[Any], task: Any, classes: Sequence[str], size: tuple[int, int]
) -> float | None:
    """mAP@.5 of ``model`` on ``samples`` (None when there are none)."""
    from training.detection.epochs import evaluate_model
    from training.detection.loader import DetectionDataset

    if not samples:
        return None
    return evaluate_model(model, DetectionDataset(list(samples), size), task, classes)[0]["map50"]


@dataclass
class DetRun:
    """What every lambda's training shares (the grid points' and the full run's)."""

    model: Any
    classes: list[str]
    state: Any  # training.ewc.EWCState over the EWC scope; None when no lambda > 0
    hooks: list[Callable[[], None]]  # after-step hooks (old predictor rows restored)
    train_ds: Any
    val_ds: Any  # the new line's val split (fit's epoch monitor)
    task: Any
    device: Any
    card: Any  # DetCard of the output run
    progress: bool

    def fit(self, lam: float, tc: Any, run_dir: Path, echo: Callable[[str], None]) -> Any:
        """Train at ``lam`` with ``tc`` (a DetTrainConfig); the best new-line val epoch is saved to
        ``run_dir`` and reloaded. Returns the ``DetFit``."""
        from training import distributed as dist
        from training.detection.epochs import fit, reload_best
        from training.engine import Engine
        from training.ewc import EWCPenalty

        terms = [EWCPenalty(self.state, self.model, lam)] if lam > 0 else []
        engine = Engine(
            task=self.task,
            device=self.device,
            amp=tc.amp,
            grad_clip=tc.grad_clip,
            terms=terms,
            after_step=self.hooks,
            progress=self.progress,
        )
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        result = fit(self.model, engine, tc, self.train_ds, self.val_ds, self.classes, run_dir, self.card, echo)
        reload_best(self.model, run_dir)
        return result


def search_lambda(
    run: DetRun,
    cfg: Any,
    out: Path,
    old_val: Sequence[Any],
    new_val: Sequence[Any],
    size: tuple[int, int],
    test_maps: Callable[[], dict[str, Any]],
    echo: Callable[[str], None],
) -> tuple[SearchResult, bool]:
    """Run ``cfg.lambdas`` (a DetExtendConfig) for ``cfg.epochs_per_point`` epochs each; ``(result, full)``.

    ``full``: the points ran the full budget, so the chosen point's weights stay loaded and its
    ``best.safetensors``, ``model.json`` and ``metrics.json`` are copied into ``out``; else the start's
    weights are loaded back for the full run. ``test_maps()`` gives the naive point's test mAPs.
    """
    from training import distributed as dist
    from training.engine import seed_everything

    n = cfg.epochs_per_point
    full = n >= cfg.train.epochs
    tc, root = cfg.train.with_(epochs=n), out / "lambda-search"
    old_before = val_map50(run.model, old_val, run.task, run.classes, size)
    echo(f"lambda auto: {len(cfg.lambdas)} points {list(cfg.lambdas)}, {n} epochs each, rule {cfg.lambda_rule}")

    def train_point(lam: float) -> GridPoint:
        t0 = time.perf_counter()
        r = run.fit(lam, tc, root / f"lambda-{lam:g}", lambda s: echo(f"  [lambda {lam:g}] {s}"))
        extra: dict[str, Any] = {
            "epochs": len(r.history),
            "best_epoch": r.best_epoch,
            "ewc_penalty_last": r.history[-1]["terms"].get("ewc") if r.history else None,
            "seconds": time.perf_counter() - t0,
        }
        if lam == 0.0:  # the naive reference, on the test splits the report's before/after use
            extra["test"] = test_maps()
        old = val_map50(run.model, old_val, run.task, run.classes, size)
        new = val_map50(run.model, new_val, run.task, run.classes, size)
        return GridPoint(lam, old, new, extra)

    res = search(
        run.model,
        cfg.lambdas,
        train_point,
        PickRule(cfg.lambda_rule),
        old_before=old_before,
        seed=lambda: seed_everything(cfg.train.seed),
        keep_weights=full,
        echo=echo,
    )
    res.points[res.chosen].extra["old_val_before"] = old_before
    if dist.is_main():
        if full:
            for f in ("best.safetensors", "model.json", "metrics.json"):
                shutil.copy2(root / f"lambda-{res.lam:g}" / f, out / f)
        shutil.rmtree(root, ignore_errors=True)
    return res, full


__all__ = ["DetRun", "search_lambda", "val_map50"]
