"""What an extension leaves: its report (accuracy of the new and old tasks before and after,
forgetting), the output run directory and the before/after table printed at the end."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runtime.fsio import atomic_write_json
from training import checkpoint as ckpt
from training.classification.extend_config import ExtendConfig
from training.classification.taskset import TaskSet, accuracy_of, drop, mean_of
from training.metrics import plot_forgetting

REPORT_PNG = "ewc_report.png"


def extension_report(
    cfg: ExtendConfig,
    lam,
    runs,
    hist: Any,
    classes,
    grown: bool,
    new: TaskSet,
    olds,
    new_ba,
    old_ba,
    growth,
    old_logits,
    replay_info,
    state,
) -> dict[str, Any]:
    """The extension's report.json: accuracy of the new and old tasks before and after, forgetting."""
    (new_before, new_after), (old_before, old_after) = new_ba, old_ba
    ob, oa = (
        mean_of([accuracy_of(m) for m in old_before.values()]),
        mean_of([accuracy_of(m) for m in old_after.values()]),
    )
    return {
        "method": cfg.method + ("+replay" if cfg.replay else ""),
        "lambda": lam if cfg.method == "ewc" else 0.0,
        "lambda_mode": "auto" if cfg.lam == "auto" else "fixed",
        "lambda_search": runs if len(runs) > 1 else None,
        "bn": cfg.bn,
        "classes": classes,
        "scenario": "new-classes" if grown else "new-domain",
        "new_task": new.name,
        "old_tasks": [t.name for t in olds],
        "new_accuracy_before": accuracy_of(new_before),
        "new_accuracy_after": accuracy_of(new_after),
        "old_accuracy_before": ob,
        "old_accuracy_after": oa,
        "forgetting": drop(ob, oa),
        "penalty_share": hist.penalty_share,
        "new": {"before": new_before, "after": new_after},
        "old": {
            t.name: {
                "before": old_before[t.name],
                "after": old_after[t.name],
                "forgetting": drop(accuracy_of(old_before[t.name]), accuracy_of(old_after[t.name])),
            }
            for t in olds
        },
        "head_growth": growth,
        "old_class_logits": old_logits or None,
        "replay": replay_info,
        "fisher": None
        if state is None
        else {"tasks": [asdict(t) for t in state.tasks], "anchor_sha256": state.anchor_sha256, "gamma": state.gamma},
    }


def write_run(out: Path, cfg: ExtendConfig, card, model, classes: list[str], new: TaskSet, outcome: Any) -> None:
    """The output run directory: model + card first, then Fisher, metrics, report and plot.
    ``outcome``: ``training.classification.extend.Outcome`` (report, state, epochs, history)."""

    report = outcome.report
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**cfg.to_dict(), "config_hash": cfg.hash()})
    src_weights = Path(cfg.source) / ckpt.BEST if Path(cfg.source).is_dir() else Path(cfg.source)
    good = list(dict.fromkeys([*card.good_classes, *[c for c in new.good_classes if c in classes]]))
    keep = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auroc")
    new_card = ckpt.ModelCard(
        backbone=card.backbone,
        num_classes=len(classes),
        classes=tuple(classes),
        good_classes=tuple(good),
        input=card.input,
        weights=str(src_weights),
        data=cfg.data.to_dict(),
        dataset_fingerprint=new.fingerprint,
        config_hash=cfg.hash(),
        metrics={
            "test": {k: (report["new"]["after"] or {}).get(k) for k in keep},
            "old_tasks": {n: {k: (v["after"] or {}).get(k) for k in keep} for n, v in report["old"].items()},
            "forgetting": report["forgetting"],
            "extended_from": str(cfg.source),
        },
    )
    ckpt.save_model(out, model, new_card)
    if outcome.state is not None:
        outcome.state.save(out)
    atomic_write_json(out / "metrics.json", outcome.epochs)
    atomic_write_json(out / "report.json", {**report, "history": outcome.history.to_dict()})
    plot_forgetting(report, outcome.history, out / REPORT_PNG)


def summary_text(report: Mapping[str, Any]) -> str:
    """The before/after table printed at the end of a run."""
    fmt = lambda v: "   n/a" if v is None else f"{v:6.4f}"  # noqa: E731
    lines = [f"{'task':<28}{'before':>8}{'after':>8}{'change':>9}"]
    nb, na = report.get("new_accuracy_before"), report.get("new_accuracy_after")
    lines.append(
        f"{'new: ' + str(report.get('new_task')):<28}{fmt(nb):>8}{fmt(na):>8}"
        f"{'' if nb is None or na is None else f'{na - nb:+9.4f}'}"
    )
    for name, v in (report.get("old") or {}).items():
        b, a = accuracy_of(v["before"]), accuracy_of(v["after"])
        lines.append(f"{'old: ' + name:<28}{fmt(b):>8}{fmt(a):>8}{'' if b is None or a is None else f'{a - b:+9.4f}'}")
    f = report.get("forgetting")
    lines.append(
        f"method {report.get('method')}, lambda {report.get('lambda'):g}, BN {report.get('bn')}; "
        f"forgetting {'n/a (no old data)' if f is None else f'{f:.4f}'}; "
        f"penalty share of the loss {report.get('penalty_share', 0.0):.3f}"
    )
    for name, lg in (report.get("old_class_logits") or {}).items():
        lines.append(
            f"old-class logits on {name}: mean |change| {lg['old_logits_mean_abs_change']:.4f}, "
            f"old argmax kept {lg['old_argmax_agreement']:.3f}, predicted as a new class "
            f"{lg['predicted_as_new_class']:.3f}"
        )
    return "\n".join(lines)
