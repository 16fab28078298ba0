#!/usr/bin/env python
"""uint8-input artifacts vs their float twins on the ELPV held-out split (issue 29's accuracy target).

A uint8-input twin (``fp32-u8``, ``int8-u8``; ``defectscope export --uint8-input``) takes the resized
uint8 frame and does cast, /255, mean/std and layout inside the graph; its float twin (``fp32``,
``int8``) takes runtime's normalised float tensor. Both are fed from the same resized frames (the one
resize implementation, ``Preprocessor.geometry``) through the runtime's own backends, so any
difference is the graph's arithmetic. Reports accuracy / macro-F1 of each, the number of held-out
images whose verdict (top-1) differs between the twins and the largest logit difference.

Usage (an idle machine is not needed: no timings):
  defectscope export RUN --out B --uint8-input && defectscope calibrate B        # fp32-u8, int8-u8
  python bench/bench_uint8_input.py --bundle B                                   # -> bench/results/uint8_input.json
  python bench/bench_uint8_input.py --bundle B --images DIR --limit 30           # smoke (ImageFolder)
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
sys.path.insert(0, str(ROOT / "bench"))

from bench_openvino_accuracy import heldout  # noqa: E402  (bench/ is the script directory)

TWINS = (("fp32", "fp32-u8"), ("int8", "int8-u8"))


def logits(bundle: Any, artifact: str, backend: str, x: np.ndarray, threads: int, batch: int) -> np.ndarray:
    from runtime.config.station import ModelConfig
    from runtime.inference.selection import create_backend

    b = create_backend(bundle, ModelConfig(bundle=bundle.path, artifact=artifact, backend=backend, threads=threads))
    try:
        return np.concatenate([b.run(x[i : i + batch])[0] for i in range(0, len(x), batch)])
    finally:
        b.close()


def compare(
    bundle: Any, y: list[int], xf: np.ndarray, xu: np.ndarray, args: argparse.Namespace
) -> list[dict[str, Any]]:
    from calibration.evaluate import prediction_metrics

    classes = list(bundle.manifest.classes)
    rows = []
    for flt, u8 in TWINS:
        if flt not in bundle.manifest.artifacts or u8 not in bundle.manifest.artifacts:
            print(f"note: the bundle lacks {flt!r} or {u8!r}; pair skipped")
            continue
        for backend in args.backends.split(","):
            lf = logits(bundle, flt, backend, xf, args.threads, args.batch)
            lu = logits(bundle, u8, backend, xu, args.threads, args.batch)
            mf = prediction_metrics(y, lf.argmax(1), classes, "test")
            mu = prediction_metrics(y, lu.argmax(1), classes, "test")
            rows.append(
                {
                    "backend": backend,
                    "float": flt,
                    "uint8": u8,
                    "n": len(y),
                    "accuracy_float": mf.accuracy,
                    "accuracy_uint8": mu.accuracy,
                    "macro_f1_float": mf.macro_f1,
                    "macro_f1_uint8": mu.macro_f1,
                    "differing_verdicts": int((lf.argmax(1) != lu.argmax(1)).sum()),
                    "max_abs_logit_diff": float(np.abs(lf - lu).max()),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", help="ImageFolder DIR/<class>/* instead of the ELPV held-out split")
    p.add_argument("--limit", type=int, default=0, help="first N held-out images only (smoke runs)")
    p.add_argument("--backends", default="onnxruntime-cpu,openvino", help="runtime backends (comma list)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "uint8_input.json"))
    args = p.parse_args(argv)

    from runtime.bundle.load import load_bundle
    from runtime.inference.preprocess import Preprocessor, read_image

    bundle = load_bundle(args.bundle)
    paths, y = heldout(args, list(bundle.manifest.classes))
    pre = Preprocessor(bundle.manifest.input)
    frames = [read_image(q) for q in paths]
    xf = pre.batch(frames)  # (N,C,H,W) float32, the float twins' input
    xu = np.stack([pre.frame_uint8(f) for f in frames])  # (N,H,W,C) uint8 BGR, the uint8 twins' input
    rows = compare(bundle, y, xf, xu, args)
    print(f"held-out images: {len(y)}")
    print(
        f"{'backend':16} {'float -> uint8':16} {'accuracy':>17} {'macro-F1':>17} {'differing':>9} {'max |dlogit|':>12}"
    )
    for r in rows:
        acc = f"{r['accuracy_float']:.4f}/{r['accuracy_uint8']:.4f}"
        f1 = f"{r['macro_f1_float']:.4f}/{r['macro_f1_uint8']:.4f}"
        print(
            f"{r['backend']:16} {r['float'] + ' -> ' + r['uint8']:16} {acc:>17} {f1:>17} "
            f"{r['differing_verdicts']:9d} {r['max_abs_logit_diff']:12.2e}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"bundle": str(args.bundle), "rows": rows}, indent=1))
    print(f"-> {args.out}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
