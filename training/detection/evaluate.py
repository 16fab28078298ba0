"""``defectscope evaluate RUN`` on a detector: COCO mAP, per-class AP / recall, the part-level
verdict, and flip TTA (merged by weighted box fusion, ``runtime.inference.boxes``) with its measured delta."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtime.inference import tta as rtta


def build_parser() -> argparse.ArgumentParser:
    from training.detection.config import DetTrainConfig, field_defaults

    thr = field_defaults(DetTrainConfig)["score_threshold"]
    p = argparse.ArgumentParser(
        prog="defectscope evaluate (detector)",
        description="Evaluate a detection run: mAP@[.5:.95], mAP@.5, per-class AP and recall (pycocotools), "
        "part-level accuracy / recall of defective parts / false-alarm rate; optional flip TTA.",
    )
    p.add_argument("checkpoint", help="detection run directory (model.json with task=detection)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--data", help="other detection data (COCO .json, VOC or YOLO folder); default: the run's")
    p.add_argument("--strict", action="store_true", help="bad annotations are fatal")
    p.add_argument("--limit", type=int, help="at most N images per split (seeded)")
    p.add_argument(
        "--tta",
        default="none",
        help=f"'none', 'flips' ({', '.join(rtta.FLIPS[1:])}) or comma-separated view names of those; "
        "views are merged by weighted box fusion and compared with the plain result",
    )
    p.add_argument("--score-threshold", type=float, default=thr, help=f"part-level verdict threshold ({thr})")
    p.add_argument(
        "--max-false-alarm",
        type=float,
        metavar="RATE",
        help="also report the part-level operating point: the score threshold chosen on val so that at most "
        "RATE of the clean val images are flagged, and recall / false alarms on --split at it (e.g. 0.02)",
    )
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="report JSON (default <run>/eval_<split>[_tta].json)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    return p


def tta_views(spec: str) -> tuple[str, ...]:
    from training.detection.predict import TTA_VIEWS

    views = rtta.expand_views(spec)
    bad = [v for v in views if v not in TTA_VIEWS]
    if bad:
        raise ValueError(f"--tta: detectors support the flip views {list(TTA_VIEWS)}, not {bad}")
    return views


def _delta(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(b) - float(a)


def evaluate_run(
    run: str,
    split: str = "test",
    data: str | None = None,
    tta: str = "none",
    limit: int | None = None,
    strict: bool = False,
    score_threshold: float = 0.5,
    max_false_alarm: float | None = None,
) -> dict[str, Any]:
    """mAP and part metrics of a detector run on ``split``, plain and with ``tta``. With ``max_false_alarm``,
    also the part-level operating point: the threshold chosen on val (at most that share of clean val
    images flagged) and the part metrics on ``split`` at it."""
    from dataclasses import replace

    if max_false_alarm is not None and not 0.0 <= max_false_alarm < 1.0:
        raise ValueError(f"--max-false-alarm: expected a rate in [0, 1), got {max_false_alarm!r}")
    from training.detection.checkpoint import load_detector
    from training.detection.datasets import DetectionSpec, resolve_detection
    from training.detection.epochs import evaluate_model
    from training.detection.loader import DetectionDataset
    from training.detection.task import DetectionTask

    model, card = load_detector(run)
    spec = DetectionSpec.from_dict(card.data, where="model.json: data") if data is None else DetectionSpec(data)
    spec = replace(spec, limit=limit or spec.limit, strict=strict or spec.strict)
    splits = resolve_detection(spec)
    missing = sorted(set(splits.classes) - set(card.classes))
    if missing:
        raise ValueError(f"{spec.path}: classes {missing} are not classes of the detector {list(card.classes)}")
    samples = splits.split(split)
    if not samples:
        raise ValueError(f"split {split!r} of {spec.path} is empty")
    # Data labels index the data's classes; the detector's order is the card's.
    remap = [card.classes.index(c) for c in splits.classes]
    samples = [replace(s, labels=tuple(remap[i] for i in s.labels)) for s in samples]
    ds = DetectionDataset(samples, card.detector.image_size)
    task = DetectionTask(score_threshold)
    plain, plain_preds = evaluate_model(model, ds, task, card.classes)
    out: dict[str, Any] = {
        "task": "detection",
        "split": split,
        "checkpoint": str(run),
        "images": len(samples),
        "classes": list(card.classes),
        "plain": plain,
        "tta": None,
        "bad_annotations": splits.report.summary(),
        "data": spec.to_dict(),
    }
    views = tta_views(tta)
    judged: dict[str, tuple[tuple[str, ...], Any]] = {"plain": (("original",), plain_preds)}
    if len(views) > 1:
        merged, merged_preds = evaluate_model(model, ds, task, card.classes, views)
        judged["tta"] = (views, merged_preds)
        out["tta"] = {"views": list(views), "merge": "weighted_box_fusion", **merged}
        out["tta_delta"] = {k: _delta(plain[k], merged[k]) for k in ("map", "map50", "map75")} | {
            f"part_{k}": _delta(plain["part"][k], merged["part"][k]) for k in ("accuracy", "recall", "false_alarm_rate")
        }
    if max_false_alarm is not None:
        val = [replace(s, labels=tuple(remap[i] for i in s.labels)) for s in splits.val]
        out["operating_point"] = _operating_points(model, judged, ds, val, card.classes, max_false_alarm, split)
    return out


def _operating_points(
    model: Any,
    judged: dict[str, Any],
    ds: Any,
    val: list[Any],
    classes: Sequence[str],
    max_false_alarm: float,
    split: str,
) -> dict[str, Any]:
    """Per setting (plain / tta): the val-chosen threshold and the part metrics on val and on ``split`` at it."""
    from runtime.inference.boxes import BoxPolicy
    from training.detection.coco_eval import operating_point, part_metrics
    from training.detection.loader import DetectionDataset
    from training.detection.predict import predict

    if not val:
        raise ValueError("operating point: the data has no val split to choose the threshold on")
    val_ds = DetectionDataset(val, ds.size)
    out: dict[str, Any] = {"max_false_alarm": max_false_alarm, "chosen_on": "val", "judged_on": split}
    for name, (views, preds) in judged.items():
        val_preds = predict(model, val_ds, views)
        t = operating_point(val, val_preds, max_false_alarm)
        if t is None:
            out[name] = {"threshold": None, "reason": "no clean val images"}
            continue
        policy = BoxPolicy(default_threshold=t)
        out[name] = {
            "threshold": t,
            "val": part_metrics(val, val_preds, classes, policy),
            split: part_metrics(ds.samples, preds, classes, policy),
        }
    return out


def _per_class(c: str, key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda m: m["per_class"][c][key]


def _v(x: Any) -> str:
    return "   n/a" if x is None else f"{x:.4f}"


def format_table(r: dict[str, Any]) -> str:
    cols = [("plain", r["plain"])] + ([("tta", r["tta"])] if r.get("tta") else [])
    lines = [f"{'':<24}" + "".join(f"{n:>10}" for n, _ in cols)]
    rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("mAP@[.5:.95]", lambda m: m["map"]),
        ("mAP@.5", lambda m: m["map50"]),
        ("part accuracy", lambda m: m["part"]["accuracy"]),
        ("part recall (defective)", lambda m: m["part"]["recall"]),
        ("false-alarm rate", lambda m: m["part"]["false_alarm_rate"]),
    ]
    rows += [(f"AP50 {c}", _per_class(c, "ap50")) for c in r["classes"]]
    rows += [(f"recall@.5 {c}", _per_class(c, "recall50")) for c in r["classes"]]
    for name, get in rows:
        lines.append(f"{name:<24}" + "".join(f"{_v(get(m)):>10}" for _, m in cols))
    op = r.get("operating_point")
    if op:
        for name, _ in cols:
            o = op.get(name) or {}
            if o.get("threshold") is None:
                continue
            m = o[op["judged_on"]]
            lines.append(
                f"{name}: threshold {o['threshold']:.4f} (chosen on val for false alarms <= "
                f"{op['max_false_alarm']:g}): {op['judged_on']} recall {_v(m['recall'])}, "
                f"false alarms {_v(m['false_alarm_rate'])}"
            )
    if r.get("tta_delta"):
        lines.append("TTA delta: " + ", ".join(f"{k} {v:+.4f}" for k, v in r["tta_delta"].items() if v is not None))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from training.checkpoint import CheckpointError
    from training.data import DataError
    from training.engine import setup_runtime

    setup_runtime(ns.threads, 0)
    try:
        r = evaluate_run(
            ns.checkpoint, ns.split, ns.data, ns.tta, ns.limit, ns.strict, ns.score_threshold, ns.max_false_alarm
        )
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from runtime.fsio import atomic_write_json

    ck = Path(ns.checkpoint)
    run_dir = ck if ck.is_dir() else ck.parent
    suffix = "" if ns.tta == "none" else "_" + "".join(c if c.isalnum() else "-" for c in ns.tta)
    atomic_write_json(Path(ns.out) if ns.out else run_dir / f"eval_{ns.split}{suffix}.json", r)
    print(
        json.dumps(r, indent=2, default=str)
        if ns.json
        else f"detector on {ns.split} split: {r['images']} images\n{format_table(r)}"
    )
    return 0


__all__ = ["build_parser", "evaluate_run", "format_table", "main", "tta_views"]
