#!/usr/bin/env python3
"""Reference: INT8 vs FP32 ONNX Runtime speed of the *ImageNet* EfficientNet-Lite0 (1000 classes).

Issue 3 quotes 2.6x INT8/FP32 at batch 8 "for the ImageNet model on this machine". This
script measures that model through the project's own export and quantization (QDQ,
per-channel U8S8; minmax ranges on synthetic inputs, which changes no kernel and so no
speed), all-INT8 and with the shipped speed-aware float prefix, so the fine-tuned
model's ratio (bench_calibration.py) can be compared with the same ONNX Runtime build.
Speed only: ImageNet labels are not available offline, so no accuracy here.

    python bench/bench_int8_reference.py --threads 2

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="input size (default 224, the ImageNet size)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=40, help="timed runs per measurement (median)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best median kept per model")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "int8-reference.json"))
    return p.parse_args(argv)


def imagenet_lite0(size: int):
    """efficientnet_lite0 as a 1000-class classifier with the pip-shipped ImageNet head."""
    import torch

    from training.backbones import REGISTRY, build_model, lite0_weights_path, sized_input

    spec = sized_input(REGISTRY["efficientnet_lite0"], size)
    model = build_model("efficientnet_lite0", 1000, weights="imagenet", input_spec=spec).eval()
    state = torch.load(str(lite0_weights_path()), weights_only=True)
    with torch.no_grad():
        model.head[1].weight.copy_(state["_fc.weight"])  # type: ignore[operator]
        model.head[1].bias.copy_(state["_fc.bias"])  # type: ignore[operator]
    return model, spec


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import numpy as np
    import onnxruntime as ort

    from calibration.evaluate import ort_session
    from calibration.export import export_onnx
    from calibration.quantize import QuantConfig, compute_nodes, prepare_float_model, quantize_model
    from calibration.speed import SpeedSettings, search_float_prefix, throughput

    model, spec = imagenet_lite0(a.size)
    rng = np.random.default_rng(0)
    x_cal = rng.uniform(-1, 1, (64, *spec.shape)).astype(np.float32)  # (N,3,H,W) float32
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}",
        "threads": a.threads,
        "size": a.size,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="defectscope-int8ref-") as tmp:
        t = Path(tmp)
        export_onnx(model, spec, t / "fp32.onnx", 1000)
        prepare_float_model(t / "fp32.onnx", t / "pre.onnx")
        cfg, ranges = QuantConfig(method="minmax"), t / "ranges.json"
        quantize_model(t / "pre.onnx", t / "int8.onnx", cfg, ranges, x_cal)
        chosen = search_float_prefix(t / "pre.onnx", cfg, ranges, x_cal, SpeedSettings.parse("auto"), a.threads)
        quantize_model(t / "pre.onnx", t / "int8-prefix.onnx", cfg, ranges, nodes_to_exclude=chosen.float_nodes)
        names = {
            "ORT FP32": "fp32.onnx",
            "ORT INT8 (all INT8)": "int8.onnx",
            f"ORT INT8 (float prefix {len(chosen.float_nodes)})": "int8-prefix.onnx",
        }
        sessions = {k: ort_session(t / f, a.threads) for k, f in names.items()}
        best: dict = {}
        for _ in range(a.rounds):  # interleaved, so drift hits every model alike
            for k, s in sessions.items():
                for batch in (1, 8):
                    v = throughput(s, x_cal[:batch], a.repeats)
                    best[(k, batch)] = max(best.get((k, batch), 0.0), v)
        results["compute_layers"] = len(compute_nodes(t / "pre.onnx"))
    fp32_b8 = best[("ORT FP32", 8)]
    print(f"ImageNet efficientnet_lite0, {a.size} px, {a.threads} thread(s), {results['machine']}")
    print(f"{'model':<30}{'batch 1 ms':>12}{'batch 8 img/s':>15}{'vs FP32 b8':>12}")
    for k in names:
        row = {
            "model": k,
            "batch1_ms": 1000.0 / best[(k, 1)],
            "batch8_img_s": best[(k, 8)],
            "ratio_b8": best[(k, 8)] / fp32_b8,
        }
        results["rows"].append(row)
        print(f"{k:<30}{row['batch1_ms']:>12.2f}{row['batch8_img_s']:>15.1f}{row['ratio_b8']:>11.2f}x")
    from runtime.fsio import atomic_write_json

    atomic_write_json(a.out, results)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
