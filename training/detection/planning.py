"""``--plan auto`` for detectors: the training split's fingerprint -> settings the user did not set.

A user's own setting always wins: model keys present in ``cfg.model`` and run keys named in
``cfg.pinned`` (the CLI pins every flag and config-file key given) are kept, the rest planned
(training.plan has the rules). The small-data warning is given whatever the mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from training.detection.config import DetTrainConfig
from training.detection.tv_detectors import COCO_DETECTORS
from training.plan import Plan, detection_fingerprint, plan_detection, small_data_warnings

RUN_KEYS = ("epochs", "patience", "batch_size")  # planned DetTrainConfig keys; the rest are DetectorSpec keys


def make_plan(cfg: DetTrainConfig, samples: Sequence[Any], classes: Sequence[str]) -> Plan:
    backbone = cfg.model.get("backbone")
    arch = COCO_DETECTORS.get(str(backbone)) if backbone else None
    fp = detection_fingerprint(samples, classes)
    if arch is None:
        return plan_detection(fp)
    coco = cfg.model.get("det_init") == "coco"
    # A COCO start keeps its RPN head's anchor count (3 ratios) so that head loads whole.
    return plan_detection(fp, levels=arch.levels, per_level=arch.per_level, n_ratios=3 if coco else None)


def apply_plan(cfg: DetTrainConfig, plan: Plan) -> tuple[DetTrainConfig, list[str]]:
    """``cfg`` with the plan's choices for every key the user left unset; also the keys applied."""
    model, run, applied = dict(cfg.model), dict[str, Any](), list[str]()
    for k, v in plan.choices.items():
        if k in RUN_KEYS:
            if k not in cfg.pinned:
                run[k] = v
                applied.append(k)
        elif k not in cfg.model:
            model[k] = v
            applied.append(k)
    if "batch_size" in run and "lr" not in cfg.pinned:
        run["lr"] = cfg.lr * run["batch_size"] / cfg.batch_size  # linear scaling from the default's batch
    return cfg.with_(model=model, **run), applied


def warn_small_data(
    samples: Sequence[Any], classes: Sequence[str], echo: Callable[[str], None], present_only: bool = False
) -> None:
    """Echo the small-data warnings; ``present_only``: classes absent from ``samples`` are not named (extend:
    old classes come from the source run)."""
    fp = detection_fingerprint(samples, classes)
    if present_only:
        from dataclasses import replace

        fp = replace(fp, instances={c: n for c, n in fp.instances.items() if n})
    for w in small_data_warnings(fp):
        echo(f"warning: {w}")


def plan_run(
    cfg: DetTrainConfig, samples: Sequence[Any], classes: Sequence[str], echo: Callable[[str], None]
) -> tuple[DetTrainConfig, dict[str, Any] | None]:
    """Warn on small data; with ``cfg.plan == "auto"`` plan and apply. Returns the config and the plan record."""
    if cfg.plan != "auto":
        warn_small_data(samples, classes, echo)
        return cfg, None
    plan = make_plan(cfg, samples, classes)
    cfg, applied = apply_plan(cfg, plan)
    for line in plan.lines(applied):
        echo(line)
    return cfg, {**plan.to_dict(), "applied": applied}


__all__ = ["RUN_KEYS", "apply_plan", "make_plan", "plan_run", "warn_small_data"]
