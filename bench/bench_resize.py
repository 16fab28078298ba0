#!/usr/bin/env python
"""Resize interpolations before/after issue 30: held-out ELPV accuracy, resize time, pixel agreement.

``linear`` (cv2.INTER_LINEAR) is not bit-exact across OpenCV builds (x86 IPP vs aarch64
carotene/KleidiCV); new runs record ``linear_exact`` (INTER_LINEAR_EXACT). This measures what the
switch costs: each --bundles entry is evaluated on the ELPV held-out split (or --images) through ONNX
Runtime with its own recorded interpolation, and the first bundle is also served with every
--serve-as name (same model, other resize: the train/serve mismatch a station would see). Per name:
CPU ms per frame of the resize + crop, and the share of resized pixels that differ from ``linear``.
Bundles: one trained with ``linear`` before the change and one trained with the same recipe after
(``defectscope train --interpolation linear`` now records ``linear_exact``).

Usage (idle machine; the integrator runs it):
  python bench/bench_resize.py --bundles runs/linear-bundle,runs/exact-bundle   # -> bench/results/resize.json
  python bench/bench_resize.py --bundles B --images DIR --limit 30              # smoke
  python bench/bench_resize.py --pixels-only --images DIR                       # no model: time + pixels
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_openvino_accuracy import evaluate, heldout, resize_ms  # noqa: E402

NAMES = "linear,linear_exact,bilinear,bilinear_exact"


def pixel_rows(images: list[np.ndarray], spec: Any, names: list[str]) -> list[dict[str, Any]]:
    """Resize time and share of pixels differing from ``linear`` (same spec, other interpolation)."""
    from runtime.inference.preprocess import Preprocessor

    ref = [Preprocessor(replace(spec, interpolation="linear")).geometry(im) for im in images]
    rows = []
    for name in names:
        variant = replace(spec, interpolation=name)
        pre = Preprocessor(variant)
        got = [pre.geometry(im) for im in images]
        differ = sum(int(np.count_nonzero(a != b)) for a, b in zip(got, ref, strict=True))
        total = sum(a.size for a in ref)
        max_level = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(got, ref, strict=True))
        rows.append(
            {
                "interpolation": name,
                "resize_ms": resize_ms(images, variant),
                "pixels_differing_from_linear": differ / total,
                "max_level_diff": max_level,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--bundles", default="", help="comma list of bundles (the first also serves --serve-as)")
    p.add_argument("--images", help="ImageFolder DIR/<class>/* instead of the ELPV held-out split")
    p.add_argument("--limit", type=int, default=0, help="first N held-out images only (smoke runs)")
    p.add_argument("--serve-as", default=NAMES, help=f"interpolations to serve the first bundle with ({NAMES})")
    p.add_argument("--pair", default="onnxruntime-cpu:int8", help="backend:artifact the accuracy runs on")
    p.add_argument("--pixels-only", action="store_true", help="no model: resize time and pixel agreement only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "resize.json"))
    args = p.parse_args(argv)

    from runtime.bundle.load import load_bundle
    from runtime.inference.preprocess import InputSpec, Preprocessor, read_image

    names = [n for n in args.serve_as.split(",") if n]
    bundles = [load_bundle(b) for b in args.bundles.split(",") if b]
    if not bundles and not args.pixels_only:
        p.error("give --bundles, or --pixels-only")
    classes = list(bundles[0].manifest.classes) if bundles else ["functional", "defective"]
    if args.pixels_only and not args.images and not bundles:
        p.error("--pixels-only without --bundles needs --images")
    paths, y = heldout(args, classes)
    spec = bundles[0].manifest.input if bundles else InputSpec(height=224, width=224, resize_size=224)
    images = [read_image(q) for q in paths[:200]]
    pixels = pixel_rows(images, spec, names)
    print(
        f"resize + crop of {len(images)} held-out frames to {spec.height}x{spec.width} (resize_size "
        f"{spec.resize_size}, {spec.resize_policy})"
    )
    print(f"{'interpolation':15} {'resize ms/frame':>15} {'px != linear':>13} {'max levels':>10}")
    for r in pixels:
        print(
            f"{r['interpolation']:15} {r['resize_ms']:15.3f} {100 * r['pixels_differing_from_linear']:12.2f}% "
            f"{r['max_level_diff']:10d}"
        )
    accuracy: list[dict[str, Any]] = []
    if not args.pixels_only:
        for i, bundle in enumerate(bundles):
            own = bundle.manifest.input
            for name in [own.interpolation] + ([n for n in names if n != own.interpolation] if i == 0 else []):
                x = Preprocessor(replace(own, interpolation=name)).load_batch(paths)
                res = evaluate(bundle, args.pair, x, y, args.threads, args.batch)
                if res is not None:
                    accuracy.append(
                        {"bundle": str(bundle.path), "trained_with": own.interpolation, "served_with": name, **res}
                    )
        print(f"\nheld-out accuracy ({len(y)} images, {args.pair})")
        print(f"{'bundle':40} {'trained with':15} {'served with':15} {'accuracy':>9} {'macro_f1':>9}")
        for r in accuracy:
            print(
                f"{Path(r['bundle']).name[:40]:40} {r['trained_with']:15} {r['served_with']:15} "
                f"{r['accuracy']:9.4f} {r['macro_f1']:9.4f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": len(y), "pixels": pixels, "accuracy": accuracy}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
