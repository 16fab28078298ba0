"""``defectscope extend`` on a detector: a new line (same classes) or new defect classes, with EWC.

- New classes: ``BoxPredictor.grow_classes`` appends rows (old rows copied bit-exact) and
  ``training.heads.HeadRowFreeze`` hooks restore the old rows of ``cls_score`` and
  ``bbox_pred`` after every step, as the classifier extend does.
- EWC: the empirical Fisher of the detection loss on the old training data
  (``training.detection.ewc``) over the parameters of ``EWC_SCOPES[ewc_scope]``; the penalty
  is ``training.ewc.EWCPenalty``, an extra loss term of the engine.
- Replay (optional): old training images mixed into the new training split.
- Report: old/new mAP@.5 and mAP@[.5:.95] before and after, forgetting = old mAP@.5 lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.fsio import atomic_write_json
from training.detection.config import (
    EWC_SCOPES,
    DetExtendConfig,
)
from training.detection.formats import DetSample


@dataclass
class _Sets:
    classes: list[str]
    new_train: list[DetSample]
    new_val: list[DetSample]
    new_test: list[DetSample]
    old_train: list[DetSample]
    old_val: list[DetSample]  # held out: scores --lambda auto's grid points
    old_test: list[DetSample]
    summary: dict[str, Any] = field(default_factory=dict)


def _remap(samples: list[DetSample], data_classes: list[str], classes: list[str]) -> list[DetSample]:
    idx = [classes.index(c) for c in data_classes]
    return [replace(s, labels=tuple(idx[i] for i in s.labels)) for s in samples]


def _data(cfg: DetExtendConfig, card: Any) -> _Sets:
    from training.detection.datasets import DetectionSpec, resolve_detection

    old = resolve_detection(DetectionSpec.from_dict(card.data, where="source model.json: data"))
    new = resolve_detection(cfg.train.data)
    classes = list(card.classes) + [c for c in new.classes if c not in card.classes]
    if not new.val:
        raise ValueError(f"{cfg.train.data.path}: the new validation split is empty")
    return _Sets(
        classes,
        _remap(new.split("train"), new.classes, classes),
        _remap(new.split("val"), new.classes, classes),
        _remap(new.split("test"), new.classes, classes),
        _remap(old.train, old.classes, classes),
        _remap(old.val, old.classes, classes),
        _remap(old.test or old.val, old.classes, classes),
        {"old": old.summary(), "new": new.summary()},
    )


def _replay(cfg: DetExtendConfig, sets: _Sets) -> list[DetSample]:
    if not cfg.replay:
        return []
    from training.replay import replay_count

    n = replay_count(cfg.replay, len(sets.old_train))
    pick = np.random.default_rng(cfg.train.seed).permutation(len(sets.old_train))[:n]
    return [sets.old_train[i] for i in sorted(pick)]


def _maps(model: Any, sets: _Sets, task: Any, size: tuple[int, int]) -> dict[str, Any]:
    from training.detection.epochs import evaluate_model
    from training.detection.loader import DetectionDataset

    out = {}
    for name, samples in (("old", sets.old_test), ("new", sets.new_test or sets.new_val)):
        m, _ = evaluate_model(model, DetectionDataset(samples, size), task, sets.classes)
        out[name] = {
            "map": m["map"],
            "map50": m["map50"],
            "part_recall": m["part"]["recall"],
            "part_false_alarm_rate": m["part"]["false_alarm_rate"],
        }
    return out


def _grow(model: Any, sets: _Sets, n_old: int, freeze: bool) -> tuple[list[str], list[Callable[[], None]]]:
    from training.heads import HeadRowFreeze

    new_names = sets.classes[n_old:]
    if not new_names:
        return [], []
    pred = model.roi_heads.box_predictor
    pred.grow_classes(new_names)
    if not freeze:
        return new_names, []
    rows = n_old + 1  # + background
    return new_names, [
        HeadRowFreeze(model, "roi_heads.box_predictor.cls_score", rows),
        HeadRowFreeze(model, "roi_heads.box_predictor.bbox_pred", 4 * rows),
    ]


def extend_detector(
    cfg: DetExtendConfig, *, overwrite: bool = False, progress: bool = False, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run one detector extension into ``cfg.train.out``; returns the report (also ``report.json``)."""
    from training import distributed as dist
    from training.checkpoint import MODEL_CARD
    from training.detection.checkpoint import DetCard, load_detector
    from training.detection.ewc import detection_fisher, detection_state
    from training.detection.extend_search import DetRun, search_lambda
    from training.detection.loader import DetectionDataset
    from training.detection.model import spec_of
    from training.detection.task import DetectionTask
    from training.detection.trainer import write_outputs
    from training.detection.transforms import train_transform
    from training.engine import seed_everything, setup_runtime
    from training.lambda_search import PickRule
    from training.run_dir import RunExistsError

    t0, tc = time.perf_counter(), cfg.train
    out = Path(tc.out)
    if (out / MODEL_CARD).exists() and not overwrite:
        raise RunExistsError(f"{out}: holds a run already; pass --overwrite or another --out")
    setup_runtime(tc.threads, tc.seed)
    device = dist.setup(tc.device)  # under torchrun: rank 0 writes, every rank trains its slices
    dist.per_rank_batch(tc.batch_size, dist.world())
    echo, progress = dist.main_echo(echo), progress and dist.is_main()
    model, card = load_detector(cfg.source, device=device)
    sets, n_old = _data(cfg, card), len(card.classes)
    auto = cfg.lam == "auto" and len(cfg.lambdas) > 1
    if auto and not sets.old_val:
        raise ValueError(
            "--lambda auto scores grid points on the old line's val split, which is empty; give a fixed --lambda"
        )
    from training.detection.task import warn_small_data

    warn_small_data(sets.new_train, sets.classes, echo, present_only=True)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
    size, task = card.detector.image_size, DetectionTask(tc.score_threshold)
    before = _maps(model, sets, task, size)
    state = None
    if any(lam > 0 for lam in cfg.lambdas):
        fisher, n = detection_fisher(
            model, DetectionDataset(sets.old_train, size), cfg.fisher_samples, EWC_SCOPES[cfg.ewc_scope], seed=tc.seed
        )
        state = detection_state(model, fisher, n, card.detector.backbone, card.classes)
        if dist.is_main():
            state.save(out / "fisher_source.safetensors")
        echo(
            f"EWC: Fisher over {len(fisher)} tensors ({cfg.ewc_scope}: {', '.join(EWC_SCOPES[cfg.ewc_scope])}) "
            f"from {n} old images, lambda {cfg.lam if isinstance(cfg.lam, str) else f'{cfg.lam:g}'}"
        )
    # Growing comes after the Fisher: a grown predictor tensor is anchored on its old rows only.
    new_names, hooks = _grow(model, sets, n_old, cfg.freeze_old_rows)
    if new_names:
        echo(f"box predictor grown {n_old} -> {len(sets.classes)} classes: + {new_names}")
    replay = _replay(cfg, sets)
    h, w = size
    run = DetRun(
        model,
        sets.classes,
        state,
        hooks,
        DetectionDataset(sets.new_train + replay, size, train_transform(tc.augment, square=h == w)),
        DetectionDataset(sets.new_val, size),
        task,
        device,
        DetCard(spec_of(model), tc.data.to_dict(), config_hash=tc.hash(), parent=str(cfg.source)),
        progress,
    )
    found, full, lam = None, False, cfg.lambdas[0]
    if auto:
        test_maps = lambda: _maps(model, sets, task, size)  # noqa: E731
        found, full = search_lambda(run, cfg, out, sets.old_val, sets.new_val, size, test_maps, echo)
        lam = found.lam
    history: list[dict[str, Any]]
    if found is not None and full:
        history = json.loads((out / "metrics.json").read_text()) if dist.is_main() else []
        best_epoch = found.points[found.chosen].extra.get("best_epoch", -1)
    else:
        if auto:
            echo(f"full run at lambda {lam:g} ({tc.epochs} epochs)")
        seed_everything(tc.seed)  # as every grid point: the pick reruns as its point would at full budget
        result = run.fit(lam, tc, out, echo)
        history, best_epoch = result.history, result.best_epoch
    after = _maps(model, sets, task, size)
    m = write_outputs(
        out,
        model,
        DetectionDataset(sets.new_test or sets.new_val, size),
        task,
        sets.classes,
        "new test",
        history,
        tc.panels,
    )
    fg = (
        None
        if before["old"]["map50"] is None or after["old"]["map50"] is None
        else before["old"]["map50"] - after["old"]["map50"]
    )
    grid = found.to_dict(PickRule(cfg.lambda_rule)) if found else None
    if grid is not None:
        grid.update(epochs_per_point=cfg.epochs_per_point, full_budget_points=full)
    naive = next((p for p in (grid or {}).get("points", []) if p["lambda"] == 0.0), None)
    report = {
        "task": "detection",
        "scenario": "new classes" if new_names else "new line",
        "classes": sets.classes,
        "new_classes": new_names,
        "lambda": lam,
        "lambda_mode": "auto" if auto else "fixed",
        "lambda_search": grid,
        "naive": naive,  # lambda 0's grid point (val + test mAP@.5); None: not run (see summary_text)
        "ewc_scope": cfg.ewc_scope if lam > 0 else None,
        "replay": len(replay),
        "before": before,
        "after": after,
        "forgetting_map50": fg,
        "new_test": m,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "ewc_penalty_last": history[-1]["terms"].get("ewc") if history else None,
        "data": sets.summary,
        "wall_s": time.perf_counter() - t0,
        "search_s": found.seconds if found else 0.0,
    }
    if dist.is_main():
        atomic_write_json(out / "report.json", report)
        if grid is not None:  # the run card records the search too
            card_d = json.loads((out / MODEL_CARD).read_text())
            card_d["metrics"] = {**card_d.get("metrics", {}), "lambda_search": grid}
            atomic_write_json(out / MODEL_CARD, card_d)
    echo(summary_text(report))
    return report


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def summary_text(r: dict[str, Any]) -> str:
    """The end-of-run lines: before/after, every grid point, and the naive reference (or how to get it)."""
    b, a = r["before"], r["after"]
    lines = [
        f"{r['scenario']}: old mAP@.5 {_f(b['old']['map50'])} -> {_f(a['old']['map50'])} (forgetting "
        f"{_f(r['forgetting_map50'])}), new mAP@.5 {_f(b['new']['map50'])} -> {_f(a['new']['map50'])}, "
        f"lambda {r['lambda']:g} ({r.get('lambda_mode', 'fixed')}), replay {r['replay']}"
    ]
    grid = r.get("lambda_search")
    if grid:
        lines.append(f"lambda search ({grid['epochs_per_point']} epochs/point, val mAP@.5; {grid['reason']}):")
        for p in grid["points"]:
            mark = "  <- chosen" if p["lambda"] == grid["chosen"] else ""
            lines.append(
                f"  lambda {p['lambda']:<8g} old {_f(p['old_val'])}  new {_f(p['new_val'])}  "
                f"mean {_f(p['mean'])}{' (naive)' if p['lambda'] == 0 else ''}{mark}"
            )
    n = r.get("naive")
    if n and n.get("test"):
        t = n["test"]
        lines.append(
            f"naive reference (lambda 0, {n['epochs']} epochs): old test mAP@.5 {_f(t['old']['map50'])}, "
            f"new {_f(t['new']['map50'])}"
        )
    elif r["lambda"] != 0:
        lines.append("naive reference: not run; rerun with --lambda 0 (or --lambda auto, whose grid holds 0)")
    return "\n".join(lines)


__all__ = ["extend_detector", "summary_text"]
