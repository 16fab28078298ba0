"""``defectscope export`` and ``calibrate`` of a detector: calibration.detection_bundle and
calibration.quantize_detection behind the parsers the classifier uses (calibration.cli_args)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from calibration.cli_args import (
    EXIT_GATE,
    EXIT_PARITY,
    PARITY_IMAGES,
    calibrate_parser,
    export_parser,
    resolve_threads,
    run_command,
    run_dir_of,
    setup_torch,
)

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


def export_main(argv: list[str] | None = None) -> int:
    """``defectscope export`` of a detector run (``defectscope.tasks`` picks the task)."""
    return run_command("export", export_detection, export_parser().parse_args(argv))


def calibrate_main(argv: list[str] | None = None) -> int:
    """``defectscope calibrate`` of a detection bundle (``defectscope.tasks`` picks the task)."""
    return run_command("calibrate", calibrate_detection, calibrate_parser().parse_args(argv))


# Export options a detector cannot honour, with why: refused, never silently ignored.
EXPORT_REFUSED = {
    "no_eval": (False, "a detection bundle records its FP32 held-out mAP (the INT8 gate and stations compare to it)"),
    "no_simplify": (False, "detector graphs are not simplified (onnxslim is a classifier step)"),
    "parity_atol": (1e-3, "a detector's parity is judged by box IoU >= 0.98 and score difference, not logits"),
    "parity_min_agreement": (0.99, "a detector's parity is judged by box IoU >= 0.98 and score difference"),
}


def export_detection(args: argparse.Namespace, console: Any) -> int:
    from calibration.detection_bundle import export_run
    from calibration.export_detection import DetectionExportError

    given = [(k, why) for k, (default, why) in EXPORT_REFUSED.items() if getattr(args, k, default) != default]
    if given:
        k, why = given[0]
        raise ValueError(f"--{k.replace('_', '-')}: not for a detector ({why})")
    threads = resolve_threads(args.threads)
    setup_torch(threads)
    try:
        export_run(
            args.run,
            args.out,
            name=args.name,
            version=str(args.version),
            split=args.split,
            parity_images=args.parity_images if args.parity_images is not None else PARITY_IMAGES["detection"],
            eval_limit=args.eval_limit,
            opset=args.opset,
            threads=threads,
            force=args.force,
            echo=console.print,
            uint8_input=args.uint8_input,
        )
    except DetectionExportError as exc:
        console.print(f"[bold red]export refused:[/] the ONNX detector does not reproduce PyTorch: {exc}")
        return EXIT_PARITY
    if args.pack:
        from runtime.bundle.archive import pack

        console.print(f"packed: {pack(Path(args.out), args.pack)}")
    return 0


def calibrate_detection(args: argparse.Namespace, console: Any) -> int:
    from calibration.quantize_detection import DEFAULT_CALIBRATION_IMAGES, calibrate_bundle
    from runtime.bundle.load import load_bundle

    given = [k for k, v in CLASSIFIER_ONLY.items() if getattr(args, k, v) != v]
    if given or args.target != "cpu":
        opts = [f"--{k.replace('_', '-')}" for k in given] + (["--target"] if args.target != "cpu" else [])
        raise ValueError(f"{args.bundle}: a detection bundle; {', '.join(opts)} apply to classifiers only")
    threads = resolve_threads(args.threads)
    setup_torch(threads)
    manifest = load_bundle(args.bundle).manifest
    run_dir = run_dir_of(args, manifest)
    split = args.split or "test"
    result = calibrate_bundle(
        args.bundle,
        run_dir,
        split=split,
        select_split="val",
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
        "chosen": result.chosen.label if result.chosen else None,
        "choice": result.note or None,
        "report": result.report or None,
    }
    if args.report:
        from runtime.fsio import atomic_write_json

        atomic_write_json(Path(args.report), report)
    if result.chosen is None:
        why = f" ({result.note})" if result.note else ""
        console.print(
            f"[bold red]INT8 refused:[/] no quantization scope keeps mAP@.5 within {args.budget:g} points "
            f"of FP32{why}; the bundle is unchanged (FP32 keeps serving)"
        )
        return EXIT_GATE
    c, rep = result.chosen, result.report
    if result.note:
        console.print(f"chosen: {result.note}")
    map50, drop = (rep["int8"]["map50"] or 0.0, rep["drop_points"]) if rep else (c.map50 or 0.0, c.drop_points)
    console.print(
        f"INT8 artifact added (trial {c.label}, {c.nodes} nodes, chosen on {'val' if rep else split}): {split} mAP@.5 {map50:.4f}, drop "
        f"{drop:+.2f} points, {c.ms_per_image:.2f} ms/image vs FP32 {result.fp32_ms_per_image:.2f}"
    )
    return 0
