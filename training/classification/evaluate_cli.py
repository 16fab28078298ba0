"""``defectscope evaluate`` (parser + ``main(argv) -> int``): classifiers here, detectors in ``detection.evaluate``.

Heavy libraries (torch, torchvision, scikit-learn) are imported inside the command.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def build_evaluate_parser() -> argparse.ArgumentParser:
    from runtime.inference import tta

    p = argparse.ArgumentParser(
        prog="defectscope evaluate",
        description="Evaluate a checkpoint (run directory or .safetensors with model.json beside it) on a "
        "data split: accuracy, balanced accuracy, macro-F1, per-class P/R, AUROC, confusion "
        "matrix; optional test-time augmentation and its effect.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  defectscope evaluate runs/elpv-lite0\n"
        "  defectscope evaluate runs/elpv-lite0 --tta all --scales 0.9,1,1.15\n"
        "  defectscope evaluate runs/elpv-lite0/best.safetensors --data ./line2 --split test\n",
    )
    p.add_argument("checkpoint", help="run directory or .safetensors file")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--data", help="other data ('elpv', a folder or a CSV); default: the model card's data")
    p.add_argument("--labels", choices=("binary", "4class"), help="ELPV labels when --data elpv")
    p.add_argument("--limit", type=int, help="at most N images")
    p.add_argument("--strict", action="store_true", help="unreadable images are fatal")
    p.add_argument(
        "--tta",
        default="none",
        help="test-time augmentation, the station's [tta] vocabulary (runtime.inference.tta): a preset, "
        f"{', '.join(tta.PRESETS)} (flips: {', '.join(tta.FLIPS[1:])}; dihedral: the 8 flips and quarter "
        "turns of a square input; multiscale: scale:F views per --scales; all: flips + multiscale), "
        f"or comma-separated view names ({', '.join(tta.VIEW_FUNCTIONS)}, scale:F)",
    )
    default_scales = ",".join(f"{s:g}" for s in tta.DEFAULT_SCALES)
    p.add_argument("--scales", default=default_scales, help=f"multiscale factors of resize_size ({default_scales})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--out", help="report JSON (default <run>/eval_<split>[_tta].json); a confusion-matrix PNG is written beside it"
    )
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _eval_samples(ns: argparse.Namespace, card: Any) -> tuple[Any, Any, list]:
    """``(DataSpec, Splits, samples in the model's class indices)`` of ``defectscope evaluate``."""
    from dataclasses import replace

    from training.classification.data import DataError, DataSpec, resolve_splits, source_of
    from training.classification.evaluate import remap_samples

    if ns.data:
        src, path = source_of(ns.data)
        raw = {"source": src, "path": path}
        if ns.labels:
            raw["labels"] = ns.labels
        base = DataSpec.from_dict(raw)
    else:
        if not card.data:
            raise DataError(f"{ns.checkpoint}: model.json has no data spec; pass --data")
        base = DataSpec.from_dict(card.data, where="model.json: data")
    spec = replace(base, limit=ns.limit or base.limit, strict=ns.strict or base.strict)
    splits = resolve_splits(spec)
    samples = splits.split(ns.split)
    if not samples:
        raise DataError(f"split {ns.split!r} of {spec.path or spec.source} is empty")
    samples = remap_samples(samples, splits.classes, card.classes)
    if not ns.data and splits.fingerprint != card.dataset_fingerprint and not ns.limit:
        print(
            f"note: dataset fingerprint {splits.fingerprint} differs from training's "
            f"{card.dataset_fingerprint} (files changed?)",
            file=sys.stderr,
        )
    return spec, splits, samples


def evaluate_main(argv: list[str] | None = None) -> int:
    """``defectscope evaluate`` of a classifier (``defectscope.tasks`` picks the task)."""
    ns = build_evaluate_parser().parse_args(argv)
    from runtime.fsio import atomic_write_json
    from training.checkpoint import CheckpointError, load_model
    from training.classification.evaluate import evaluate_samples, format_table
    from training.data import DataError
    from training.engine import pick_device, setup_runtime
    from training.metrics import plot_confusion

    setup_runtime(ns.threads, 0)
    try:
        scales = tuple(float(s) for s in ns.scales.split(","))
        device = pick_device(ns.device)
        model, card = load_model(ns.checkpoint, device=device)
        spec, splits, samples = _eval_samples(ns, card)
        result = evaluate_samples(
            model,
            card,
            samples,
            tta=ns.tta,
            scales=scales,
            batch_size=ns.batch_size,
            device=device,
            progress=not ns.quiet and sys.stderr.isatty(),
        )
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.update(
        split=ns.split,
        checkpoint=str(ns.checkpoint),
        skipped=len(splits.skipped),
        skipped_files=[p for p, _ in splits.skipped],
        data=spec.to_dict(),
    )
    ck = Path(ns.checkpoint)
    run_dir = ck if ck.is_dir() else ck.parent
    suffix = "" if ns.tta == "none" else "_" + re.sub(r"[^A-Za-z0-9.]+", "-", ns.tta)
    out = Path(ns.out) if ns.out else run_dir / f"eval_{ns.split}{suffix}.json"
    atomic_write_json(out, result)
    plot_confusion(
        result["plain"]["confusion_matrix"],
        card.classes,
        out.with_suffix(".png"),
        title=f"{card.backbone} — {ns.split} (n={result['n']})",
    )
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{card.backbone} on {ns.split} split: {result['n']} images"
            + (f", {len(splits.skipped)} unreadable skipped" if splits.skipped else "")
        )
        print(format_table(result))
        print(f"report: {out}")
    return 0
