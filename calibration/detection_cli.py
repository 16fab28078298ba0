"""``defectscope calibrate`` on a detection bundle (calibration.quantize_detection behind the CLI)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# Classifier-only options: refused on a detection bundle instead of silently ignored.
CLASSIFIER_ONLY = {
    "calibration_data": None,
    "gate_metric": None,
    "save_calibration_tensor": None,
    "out": None,
    "keep_default": False,
    "per_tensor": False,
    "reduce_range": False,
    "no_fallback": False,
}


def bundle_task(bundle: str) -> str | None:
    """The manifest's ``model.task`` (None when unreadable: the classifier path reports the error)."""
    try:
        data = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8"))
        return data.get("model", {}).get("task", "classification")
    except (OSError, ValueError, AttributeError):
        return None


def calibrate_detection(args: argparse.Namespace, console: Any) -> int:
    from calibration.cli import EXIT_GATE, _run_dir, _setup_torch, _threads
    from calibration.quantize_detection import DEFAULT_CALIBRATION_IMAGES, calibrate_bundle
    from runtime.bundle import load_bundle

    given = [k for k, v in CLASSIFIER_ONLY.items() if getattr(args, k, v) != v]
    if given or args.target != "cpu":
        opts = [f"--{k.replace('_', '-')}" for k in given] + (["--target"] if args.target != "cpu" else [])
        raise ValueError(f"{args.bundle}: a detection bundle; {', '.join(opts)} apply to classifiers only")
    threads = _threads(args.threads)
    _setup_torch(threads)
    manifest = load_bundle(args.bundle).manifest
    run_dir = _run_dir(args, manifest)
    result = calibrate_bundle(
        args.bundle,
        run_dir,
        split=args.split or "test",
        limit=args.limit,
        size=args.size or DEFAULT_CALIBRATION_IMAGES,
        seed=args.seed,
        method=args.method,
        budget=args.budget,
        threads=threads,
        gate_backends=args.gate_backends,
        echo=console.print,
    )
    report = {
        "passed": result.passed,
        "budget_points": result.budget_points,
        "reference": {k: result.reference.get(k) for k in ("map", "map50", "map75")},
        "fp32_ms_per_image": result.fp32_ms_per_image,
        "trials": [t.to_dict() for t in result.trials],
        "chosen": result.chosen.scope if result.chosen else None,
    }
    if args.report:
        from runtime.fsio import atomic_write_json

        atomic_write_json(Path(args.report), report)
    if result.chosen is None:
        console.print(
            f"[bold red]INT8 refused:[/] no quantization scope keeps mAP@.5 within {args.budget:g} points "
            "of FP32; the bundle is unchanged (FP32 keeps serving)"
        )
        return EXIT_GATE
    c = result.chosen
    console.print(
        f"INT8 artifact added (scope {c.scope}, {c.nodes} nodes): mAP@.5 {c.map50:.4f}, drop "
        f"{c.drop_points:+.2f} points, {c.ms_per_image:.2f} ms/image vs FP32 {result.fp32_ms_per_image:.2f}"
    )
    return 0
