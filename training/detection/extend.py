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

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.fsio import atomic_write_json
from training.detection.config import DetTrainConfig
from training.detection.formats import DetSample

# Measured (docs/benchmarks.md, EWC on detectors; 3 seeds): with the RoI heads anchored, forgetting
# 0.34x naive at 1e5 vs 0.68x at 1e4 and 0.78x at 1e3, new-line mAP@.5 unchanged (0.999).
DEFAULT_LAMBDA = 1e5
DEFAULT_FISHER_SAMPLES = 64
# What EWC anchors, by parameter-name prefix. backbone.* holds the trunk and the FPN. "all" adds
# the RoI heads (box head fc6/fc7, box predictor): on a new line nothing else keeps them near the
# old line; a grown predictor is anchored on its old rows only (training.ewc.EWCPenalty).
EWC_SCOPES: dict[str, tuple[str, ...]] = {"trunk": ("backbone.", "rpn."), "all": ("backbone.", "rpn.", "roi_heads.")}
DEFAULT_EWC_SCOPE = "all"  # measured: "trunk" forgot 0.46x naive at 1e5 with 4.6x the seed spread of "all"


@dataclass(frozen=True)
class DetExtendConfig:
    source: str  # the detection run to extend
    train: DetTrainConfig  # new data, optimisation, out (model options come from the source)
    lam: float = DEFAULT_LAMBDA  # EWC strength; 0 = naive fine-tuning
    fisher_samples: int = DEFAULT_FISHER_SAMPLES  # old training images in the Fisher estimate
    replay: str | None = None  # old training images mixed in: a count ("50") or a share ("10%")
    freeze_old_rows: bool = True  # restore the box predictor's old class rows after each step
    ewc_scope: str = DEFAULT_EWC_SCOPE  # a key of EWC_SCOPES: which parameters the penalty anchors

    def __post_init__(self) -> None:
        if self.ewc_scope not in EWC_SCOPES:
            raise ValueError(f"ewc_scope: expected one of {sorted(EWC_SCOPES)}, got {self.ewc_scope!r}")
        if not np.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"lambda: expected a finite number >= 0, got {self.lam!r}")
        if self.fisher_samples < 1:
            raise ValueError(f"fisher_samples: expected >= 1, got {self.fisher_samples!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": "detection",
            "source": self.source,
            "train": self.train.to_dict(),
            "lam": self.lam,
            "fisher_samples": self.fisher_samples,
            "replay": self.replay,
            "freeze_old_rows": self.freeze_old_rows,
            "ewc_scope": self.ewc_scope,
        }


@dataclass
class _Sets:
    classes: list[str]
    new_train: list[DetSample]
    new_val: list[DetSample]
    new_test: list[DetSample]
    old_train: list[DetSample]
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
    from training.detection.loader import DetectionDataset
    from training.detection.trainer import evaluate_model

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
    from training.detection.loader import DetectionDataset
    from training.detection.model import spec_of
    from training.detection.task import DetectionTask
    from training.detection.trainer import fit, reload_best, write_outputs
    from training.detection.transforms import train_transform
    from training.engine import Engine, setup_runtime
    from training.ewc import EWCPenalty
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
    from training.detection.planning import warn_small_data

    warn_small_data(sets.new_train, sets.classes, echo, present_only=True)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
    size, task = card.detector.image_size, DetectionTask(tc.score_threshold)
    before = _maps(model, sets, task, size)
    terms: list[Any] = []
    if cfg.lam > 0:
        fisher, n = detection_fisher(
            model, DetectionDataset(sets.old_train, size), cfg.fisher_samples, EWC_SCOPES[cfg.ewc_scope], seed=tc.seed
        )
        state = detection_state(model, fisher, n, card.detector.backbone, card.classes)
        if dist.is_main():
            state.save(out / "fisher_source.safetensors")
        echo(
            f"EWC: Fisher over {len(fisher)} tensors ({cfg.ewc_scope}: {', '.join(EWC_SCOPES[cfg.ewc_scope])}) "
            f"from {n} old images, lambda {cfg.lam:g}"
        )
    new_names, hooks = _grow(model, sets, n_old, cfg.freeze_old_rows)
    if cfg.lam > 0:  # after growing: a grown predictor tensor is anchored on its old rows only
        terms = [EWCPenalty(state, model, cfg.lam)]
    if new_names:
        echo(f"box predictor grown {n_old} -> {len(sets.classes)} classes: + {new_names}")
    replay = _replay(cfg, sets)
    h, w = size
    train_ds = DetectionDataset(sets.new_train + replay, size, train_transform(tc.augment, square=h == w))
    engine = Engine(
        task=task, device=device, amp=tc.amp, grad_clip=tc.grad_clip, terms=terms, after_step=hooks, progress=progress
    )
    new_card = DetCard(spec_of(model), tc.data.to_dict(), config_hash=tc.hash(), parent=str(cfg.source))
    result = fit(model, engine, tc, train_ds, DetectionDataset(sets.new_val, size), sets.classes, out, new_card, echo)
    reload_best(model, out)
    after = _maps(model, sets, task, size)
    m = write_outputs(
        out,
        model,
        DetectionDataset(sets.new_test or sets.new_val, size),
        task,
        sets.classes,
        "new test",
        result.history,
        tc.panels,
    )
    fg = (
        None
        if before["old"]["map50"] is None or after["old"]["map50"] is None
        else before["old"]["map50"] - after["old"]["map50"]
    )
    report = {
        "task": "detection",
        "scenario": "new classes" if new_names else "new line",
        "classes": sets.classes,
        "new_classes": new_names,
        "lambda": cfg.lam,
        "ewc_scope": cfg.ewc_scope if cfg.lam > 0 else None,
        "replay": len(replay),
        "before": before,
        "after": after,
        "forgetting_map50": fg,
        "new_test": m,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "ewc_penalty_last": result.history[-1]["terms"].get("ewc") if result.history else None,
        "data": sets.summary,
        "wall_s": time.perf_counter() - t0,
    }
    if dist.is_main():
        atomic_write_json(out / "report.json", report)
    echo(summary_text(report))
    return report


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def summary_text(r: dict[str, Any]) -> str:
    b, a = r["before"], r["after"]
    return (
        f"{r['scenario']}: old mAP@.5 {_f(b['old']['map50'])} -> {_f(a['old']['map50'])} (forgetting "
        f"{_f(r['forgetting_map50'])}), new mAP@.5 {_f(b['new']['map50'])} -> {_f(a['new']['map50'])}, "
        f"lambda {r['lambda']:g}, replay {r['replay']}"
    )


__all__ = [
    "DEFAULT_EWC_SCOPE",
    "DEFAULT_FISHER_SAMPLES",
    "DEFAULT_LAMBDA",
    "EWC_SCOPES",
    "DetExtendConfig",
    "extend_detector",
    "summary_text",
]
