#!/usr/bin/env python
"""Where a detection bundle's CPU time goes, by ONNX op type, FP32 vs INT8 (ONNX Runtime's profiler).

Explains the INT8 speed-up of a detector: only the compute INT8 replaces (Conv, MatMul, Gemm and
their fused QLinear forms) gets faster; RoiAlign, NMS, TopK, anchor decoding and the Q/DQ
conversions at the float boundaries do not. The "bound" column is Amdahl's: FP32 time over the FP32
time outside convolutions and matrix products, i.e. the speed-up if quantized compute cost nothing.
Per-op kernel times are summed over the images (profiling adds a little overhead: compare the two
columns, not against un-profiled latency). Prints a table and writes JSON.

    python bench/profile_detection_ops.py --bundle runs/bench-det/bundle --images runs/bench-det/data/images/test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Op types INT8 can replace (their quantized/fused forms included): the part that gets faster.
COMPUTE = {
    "Conv",
    "FusedConv",
    "MatMul",
    "Gemm",
    "FusedGemm",
    "FusedMatMul",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "QGemm",
    "NhwcFusedConv",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
}
CONVERSION = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Control flow: ORT profiles the nodes of its subgraphs (batched NMS) one by one, so its own
# kernel time would count them twice.
CONTROL_FLOW = {"If", "Loop", "Scan"}


def group(op: str) -> str:
    if op in COMPUTE:
        return "conv/matmul (INT8 speeds up)"
    if op in CONVERSION:
        return "Q/DQ conversions"
    return "float only (RoiAlign, NMS, TopK, shape/decode ops)"


def profile(model: Path, xs: list[Any], threads: int) -> tuple[dict[str, float], float]:
    """Per op type summed kernel ms per image, and the per-image total, over ``xs`` after 2 warm-ups."""
    from runtime.inference.ort_session import ort_session

    with tempfile.TemporaryDirectory(prefix="defectscope-prof-") as tmp:
        sess = ort_session(model, threads, profile_prefix=str(Path(tmp) / "prof"))
        name = sess.get_inputs()[0].name
        for x in xs[:2]:
            sess.run(None, {name: x})
        for x in xs:
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    # The warm-up runs are profiled too: keep the events after the end of the second model_run.
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    t_mark_us = runs[1]["ts"] + runs[1]["dur"] if len(runs) > len(xs) else 0
    per_op: dict[str, float] = defaultdict(float)
    total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if e.get("ts", 0) < t_mark_us:
            continue
        op = e.get("args", {}).get("op_name", "?")
        if op in CONTROL_FLOW:
            continue
        per_op[op] += e["dur"] / 1e3 / len(xs)  # us -> ms per image
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run" and e.get("ts", 0) >= t_mark_us:
            total += e["dur"] / 1e3 / len(xs)
    return dict(per_op), total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", required=True, help="a folder of images (the held-out split)")
    p.add_argument("--n", type=int, default=20, help="images profiled")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="result JSON (default <bundle>/../profile_detection_ops.json)")
    ns = p.parse_args(argv)
    import numpy as np

    from runtime.bundle.load import load_bundle
    from runtime.inference.preprocess import Preprocessor, read_image

    bundle = load_bundle(ns.bundle)
    pre = Preprocessor(bundle.manifest.input)
    files = sorted(f for f in Path(ns.images).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not files:
        raise SystemExit(f"{ns.images}: no images")
    xs = [pre(read_image(f))[None].astype(np.float32) for f in files[: ns.n]]
    keys = [k for k in ("fp32", "int8") if k in bundle.manifest.artifacts]
    if "fp32" not in keys:
        raise SystemExit(f"{ns.bundle}: no fp32 artifact")
    res: dict[str, Any] = {}
    for k in keys:
        per_op, total = profile(bundle.artifact_path(k), xs, ns.threads)
        groups: dict[str, float] = defaultdict(float)
        for op, ms in per_op.items():
            groups[group(op)] += ms
        res[k] = {"total_ms": total, "ops_ms": per_op, "groups_ms": dict(groups)}
    fp = res["fp32"]
    not_compute = fp["total_ms"] - fp["groups_ms"].get("conv/matmul (INT8 speeds up)", 0.0)
    bound = fp["total_ms"] / not_compute if not_compute > 0 else None
    print(f"{len(xs)} images, {ns.threads} threads; ms per image (ONNX Runtime profiler, kernel time)")
    names = sorted({g for r in res.values() for g in r["groups_ms"]})
    print(f"{'part':52} " + " ".join(f"{k:>8}" for k in keys))
    for g in names:
        print(f"{g:52} " + " ".join(f"{res[k]['groups_ms'].get(g, 0.0):8.2f}" for k in keys))
    print(f"{'model_run (wall, incl. scheduling)':52} " + " ".join(f"{res[k]['total_ms']:8.2f}" for k in keys))
    top = sorted(fp["ops_ms"].items(), key=lambda kv: -kv[1])[:8]
    print("FP32 top ops: " + ", ".join(f"{op} {ms:.2f}" for op, ms in top))
    if "int8" in res:
        top8 = sorted(res["int8"]["ops_ms"].items(), key=lambda kv: -kv[1])[:8]
        print("INT8 top ops: " + ", ".join(f"{op} {ms:.2f}" for op, ms in top8))
        print(f"INT8 / FP32 (profiled): {fp['total_ms'] / res['int8']['total_ms']:.2f}x")
    if bound:
        print(f"Amdahl bound (conv/matmul free): {bound:.2f}x FP32")
    out = Path(ns.json) if ns.json else Path(ns.bundle).parent / "profile_detection_ops.json"
    from runtime.fsio import atomic_write_json

    atomic_write_json(
        out, {"bundle": str(ns.bundle), "images": len(xs), "threads": ns.threads, "results": res, "amdahl_bound": bound}
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
