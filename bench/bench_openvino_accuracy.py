#!/usr/bin/env python
"""OpenVINO backend accuracy vs ONNX Runtime on the ELPV held-out split (issue 18 target: INT8 within 0.5 points).

Every (artifact, backend) pair runs through the runtime's own backends (runtime.inference.selection.create_backend,
named backend, the OpenVINO precision set explicitly), on the held-out images preprocessed once by
the runtime's Preprocessor: ELPV test split of the reference protocol (stratified 75/25 by class x
cell type, seed 0; n=656), or an ImageFolder (--images DIR/<class>/*.png) for smoke runs. Reports
accuracy and macro-F1 per pair and the difference to ONNX Runtime on the same artifact in points.

--interpolations linear also serves the held-out images resized with each named interpolation (the
bundle's model unchanged, on --interp-pairs) and times the resize per frame: the measured answer to
"the cheapest resize that keeps accuracy" (a model trained with a different resize pays a train/serve
mismatch; training uses the bundle's InputSpec.interpolation, so a change means retraining).

Usage (idle machine):
  python bench/bench_openvino_accuracy.py --bundle runs/elpv-bundle      # -> bench/results/openvino_accuracy.json
  python bench/bench_openvino_accuracy.py --bundle B --images DIR --limit 30     # smoke
  python bench/bench_openvino_accuracy.py --bundle B --interpolations linear --pairs onnxruntime-cpu:int8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_POINTS = 0.5
PAIRS = "onnxruntime-cpu:int8,openvino:int8:f32,openvino:int8:bf16,onnxruntime-cpu:fp32,openvino:fp32:f32,openvino:fp32:bf16"


def heldout(args: argparse.Namespace, classes: list[str]) -> tuple[list[Path], list[int]]:
    if args.images:
        root = Path(args.images)
        items = [
            (p, classes.index(c.name))
            for c in sorted(root.iterdir())
            if c.is_dir() and c.name in classes
            for p in sorted(c.iterdir())
            if p.is_file()
        ]
        rng = np.random.default_rng(0)
        items = [items[i] for i in rng.permutation(len(items))]
    else:
        from training.classification.data import resolve_splits  # numpy-only module: no torch import

        splits = resolve_splits({"source": "elpv", "verify": False, "seed": 0, "test_fraction": 0.25})
        if list(splits.classes) != classes:
            raise SystemExit(f"the bundle's classes {classes} are not the ELPV split's {list(splits.classes)}")
        items = [(Path(s.path), s.label) for s in splits.test]
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise SystemExit("no held-out images")
    return [p for p, _ in items], [y for _, y in items]


def evaluate(bundle: Any, pair: str, x: np.ndarray, y: list[int], threads: int, batch: int) -> dict[str, Any] | None:
    from calibration.evaluate import prediction_metrics
    from runtime.config.station import ModelConfig, OpenVINOConfig
    from runtime.inference.backends import BackendError
    from runtime.inference.selection import create_backend

    backend_name, artifact, *prec = pair.split(":")
    if artifact not in bundle.manifest.artifacts:
        print(f"note: no artifact {artifact!r}; {pair} skipped")
        return None
    cfg = ModelConfig(
        bundle=bundle.path,
        artifact=artifact,
        backend=backend_name,
        threads=threads,
        openvino=OpenVINOConfig(precision=prec[0] if prec else "f32"),
    )
    try:
        backend = create_backend(bundle, cfg)
    except BackendError as exc:
        print(f"note: {pair} not usable here: {exc}")
        return None
    try:
        logits = np.concatenate([backend.run(x[i : i + batch])[0] for i in range(0, len(x), batch)])
    finally:
        backend.close()
    m = prediction_metrics(y, logits.argmax(1), list(bundle.manifest.classes), "test")
    return {
        "pair": pair,
        "backend": backend.name,
        "artifact": artifact,
        "inference_precision": backend.inference_precision,
        **m.to_dict(),
    }


def resize_ms(images: list[np.ndarray], spec: Any, repeats: int = 3) -> float:
    """CPU ms per frame of the runtime's resize + crop (geometry) for this spec, best of ``repeats``."""
    import time

    from runtime.inference.preprocess import Preprocessor

    pre = Preprocessor(spec)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for im in images:
            pre.geometry(im)
        best = min(best, (time.process_time() - t0) * 1000 / len(images))
    return best


def interpolation_rows(
    args: argparse.Namespace, bundle: Any, paths: list[Path], y: list[int], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    from dataclasses import replace

    from runtime.inference.preprocess import Preprocessor, read_image

    spec = bundle.manifest.input
    names = [n for n in args.interpolations.split(",") if n]
    if not names:
        return []
    images = [read_image(p) for p in paths[:200]]
    out = [
        {
            "interpolation": spec.interpolation,
            "bundle": True,
            "resize_ms": resize_ms(images, spec),
            "rows": [r for r in rows if r["pair"] in args.interp_pairs.split(",")],
        }
    ]
    for name in names:
        variant = replace(spec, interpolation=name)
        x = Preprocessor(variant).load_batch(paths)
        got = [
            r
            for r in (evaluate(bundle, pair, x, y, args.threads, args.batch) for pair in args.interp_pairs.split(","))
            if r is not None
        ]
        out.append({"interpolation": name, "bundle": False, "resize_ms": resize_ms(images, variant), "rows": got})
    print(f"\nresize interpolation (the bundle's model; training resized with {spec.interpolation!r})")
    print(f"{'interpolation':14} {'resize ms/frame':>15} {'pair':24} {'accuracy':>9} {'diff pts':>9}")
    base = {r["pair"]: r["accuracy"] for r in out[0]["rows"]}
    for o in out:
        for r in o["rows"] or [{"pair": "-", "accuracy": float("nan")}]:
            diff = 100 * (r["accuracy"] - base.get(r["pair"], float("nan")))
            r["diff_points_vs_bundle_interpolation"] = diff
            print(f"{o['interpolation']:14} {o['resize_ms']:15.3f} {r['pair']:24} {r['accuracy']:9.4f} {diff:+9.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", help="ImageFolder DIR/<class>/* instead of the ELPV held-out split")
    p.add_argument("--limit", type=int, default=0, help="first N held-out images only (smoke runs)")
    p.add_argument("--pairs", default=PAIRS, help=f"backend:artifact[:precision] list (default {PAIRS})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--interpolations",
        default="",
        help="also serve with these resize interpolations "
        "(comma list of runtime.inference.preprocess.INTERPOLATIONS, e.g. linear) on --interp-pairs",
    )
    p.add_argument("--interp-pairs", default="onnxruntime-cpu:int8")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "openvino_accuracy.json"))
    args = p.parse_args(argv)

    from runtime.bundle.load import load_bundle
    from runtime.inference.preprocess import Preprocessor

    bundle = load_bundle(args.bundle)
    paths, y = heldout(args, list(bundle.manifest.classes))
    x = Preprocessor(bundle.manifest.input).load_batch(paths)
    rows = [
        r
        for r in (evaluate(bundle, pair, x, y, args.threads, args.batch) for pair in args.pairs.split(","))
        if r is not None
    ]
    # Each OpenVINO row against ONNX Runtime on the same artifact (INT8: the target).
    refs = {r["artifact"]: r for r in rows if r["backend"].startswith("onnxruntime")}
    print(
        f"held-out images: {len(y)}; reference: ONNX Runtime on the same artifact; target |diff| <= "
        f"{TARGET_POINTS} points"
    )
    print(f"{'pair':24} {'runs as':8} {'accuracy':>9} {'macro_f1':>9} {'diff pts':>9}  check")
    for r in rows:
        ref = refs.get(r["artifact"])
        diff = 100 * (r["accuracy"] - ref["accuracy"]) if ref else float("nan")
        r["diff_points_vs_ort"] = diff
        gated = ref is not None and r["backend"] == "openvino"
        r["pass"] = abs(diff) <= TARGET_POINTS + 1e-9 if gated else None
        check = ("PASS" if r["pass"] else "FAIL") if gated else "-"
        print(
            f"{r['pair']:24} {r['inference_precision']:8} {r['accuracy']:9.4f} {r['macro_f1']:9.4f} "
            f"{diff:+9.2f}  {check}"
        )
    interp_rows = interpolation_rows(args, bundle, paths, y, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"n": len(y), "target_points": TARGET_POINTS, "rows": rows, "interpolations": interp_rows}, indent=2)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
