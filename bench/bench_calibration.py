#!/usr/bin/env python3
"""Benchmark: FP32 vs INT8 of a fine-tuned classifier (ELPV EfficientNet-Lite0 by default).

Exports the run to a bundle, calibrates it (the shipped pipeline: gate + float
fallback), then reports held-out accuracy / macro-F1 of FP32 and INT8, CPU latency
at batch 1 and throughput at batch 8 for PyTorch eager, ONNX Runtime FP32 and ONNX
Runtime INT8, and file sizes. Prints a table, writes JSON (and a PNG chart).

Targets (issue 3): INT8 accuracy drop <= 1 point; INT8 >= 2.2x FP32 ORT throughput
at batch 8; ORT FP32 >= 3x PyTorch eager (batch 1 latency).

    python bench/bench_calibration.py --run runs/elpv-lite0 --threads 1
    python bench/bench_calibration.py --run runs/elpv-lite0 --limit 40 --size 16 --iters 5   # smoke

Run it on an otherwise idle machine: a second busy process distorts CPU timings badly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {"int8_drop_points_max": 1.0, "int8_vs_fp32_ort_throughput_b8_min": 2.2, "ort_fp32_vs_torch_b1_min": 3.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="training run directory (fine-tuned efficientnet_lite0 on ELPV)")
    p.add_argument("--bundle", help="use this already calibrated bundle instead of exporting + calibrating --run")
    p.add_argument(
        "--work",
        default=str(ROOT / "bench" / "results" / "calibration-work"),
        help="where the exported bundle and reports go",
    )
    p.add_argument("--method", default="entropy", choices=("minmax", "entropy", "percentile"))
    p.add_argument("--size", type=int, default=300, help="calibration images (default 300)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ONNX Runtime (default 1)")
    p.add_argument("--limit", type=int, help="held-out images for the accuracy numbers (default: the whole split)")
    p.add_argument("--iters", type=int, default=50, help="timed runs per measurement (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--batch", type=int, default=8, help="throughput batch size (default 8)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration.json"), help="JSON results")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    return p.parse_args(argv)


def _runner(sess: Any, name: str, x: Any) -> Callable[[], Any]:
    return lambda: sess.run(None, {name: x})


def _median_seconds(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prepare_bundle(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """Export + calibrate ``--run`` into ``work``; returns (bundle, notes)."""
    from calibration.cli import EXIT_GATE, calibrate_main, export_main

    bundle = work / "bundle"
    threads = ["--threads", str(args.threads)]
    limit = ["--limit", str(args.limit)] if args.limit else []
    rc = export_main(
        [args.run, "--out", str(bundle), "--force", *threads]
        + (["--eval-limit", str(args.limit)] if args.limit else [])
    )
    if rc != 0:
        raise SystemExit(f"export failed (exit {rc})")
    report = work / "calibration-report.json"
    common = [str(bundle), "--method", args.method, "--size", str(args.size), "--report", str(report), *threads, *limit]
    rc = calibrate_main(common)
    notes: dict[str, Any] = {"gate_passed": rc == 0}
    if rc == EXIT_GATE:
        # Still measure the INT8 model the gate refused (its numbers are the point of a benchmark).
        notes["gate_report"] = json.loads(report.read_text())
        rc = calibrate_main([*common, "--budget", "100", "--no-fallback"])
    if rc != 0:
        raise SystemExit(f"calibrate failed (exit {rc})")
    notes["calibration_report"] = json.loads(report.read_text())
    return bundle, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run and not args.bundle:
        print(
            "give --run RUN_DIR (a fine-tuned efficientnet_lite0, e.g. from "
            "`defectscope train --data elpv --out runs/elpv-lite0`) or --bundle DIR",
            file=sys.stderr,
        )
        return 2
    os.environ["DEFECTSCOPE_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    from calibration.calibset import preprocess_paths
    from calibration.evaluate import ort_session
    from runtime.bundle.load import load_bundle
    from training.checkpoint import load_model
    from training.classification.data import resolve_splits

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    notes: dict[str, Any] = {}
    if args.bundle:
        bundle_dir = Path(args.bundle)
    else:
        bundle_dir, notes = _prepare_bundle(args, work)
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if "int8" not in m.artifacts:
        raise SystemExit(f"{bundle_dir}: no 'int8' artifact (run defectscope calibrate first)")
    run = args.run or (m.provenance.get("training") or {}).get("run_dir")
    if not run:
        raise SystemExit(f"{bundle_dir}: the manifest names no training run; pass --run")
    model, card = load_model(run)
    model.eval()

    # Timing inputs: real preprocessed held-out images.
    splits = resolve_splits(card.data)
    held = (splits.test or splits.val)[: max(args.batch, 1)]
    x = preprocess_paths([s.path for s in held], m.input, threads=args.threads)
    x1, xb = x[:1], np.ascontiguousarray(np.resize(x, (args.batch, *x.shape[1:])))

    rows: dict[str, dict[str, Any]] = {}

    def measure(name: str, run1: Callable[[], Any], runb: Callable[[], Any], size: int | None) -> None:
        t1 = _median_seconds(run1, args.iters, args.warmup)
        tb = _median_seconds(runb, max(args.iters // 2, 3), args.warmup)
        rows[name] = {
            "latency_b1_ms": t1 * 1e3,
            f"throughput_b{args.batch}_img_s": args.batch / tb,
            f"ms_per_img_b{args.batch}": tb * 1e3 / args.batch,
            "file_bytes": size,
        }
        print(f"{name:<12} batch 1 {t1 * 1e3:7.2f} ms   batch {args.batch} {args.batch / tb:7.1f} img/s", flush=True)

    weights = Path(run) / "best.safetensors" if Path(run).is_dir() else Path(run)
    with torch.inference_mode():
        t1, tb = torch.from_numpy(x1), torch.from_numpy(xb)
        measure("torch eager", lambda: model(t1), lambda: model(tb), weights.stat().st_size)
    for key, label in (("fp32", "ORT FP32"), ("int8", "ORT INT8"), ("int8-trt", "ORT INT8 sym")):
        if key not in m.artifacts:
            continue
        sess = ort_session(bundle.artifact_path(key), args.threads)
        name = m.input.name
        measure(label, _runner(sess, name, x1), _runner(sess, name, xb), bundle.artifact_path(key).stat().st_size)

    tp = f"throughput_b{args.batch}_img_s"
    fp32_m, int8_m = m.metrics.get("fp32", {}), m.metrics.get("int8", {})
    drop_acc = 100 * (fp32_m.get("accuracy", 0) - int8_m.get("accuracy", 0))
    drop_f1 = 100 * (fp32_m.get("macro_f1", 0) - int8_m.get("macro_f1", 0))
    speed_int8 = rows["ORT INT8"][tp] / rows["ORT FP32"][tp]
    speed_ort = rows["torch eager"]["latency_b1_ms"] / rows["ORT FP32"]["latency_b1_ms"]
    checks = {
        "int8_accuracy_drop_points": {
            "value": round(drop_acc, 3),
            "target": f"<= {TARGETS['int8_drop_points_max']}",
            "met": drop_acc <= TARGETS["int8_drop_points_max"],
        },
        f"int8_vs_fp32_ort_throughput_b{args.batch}": {
            "value": round(speed_int8, 3),
            "target": f">= {TARGETS['int8_vs_fp32_ort_throughput_b8_min']}",
            "met": speed_int8 >= TARGETS["int8_vs_fp32_ort_throughput_b8_min"],
        },
        "ort_fp32_vs_torch_eager_b1": {
            "value": round(speed_ort, 3),
            "target": f">= {TARGETS['ort_fp32_vs_torch_b1_min']}",
            "met": speed_ort >= TARGETS["ort_fp32_vs_torch_b1_min"],
        },
    }
    result = {
        "bundle": str(bundle.path),
        "model": m.model.name,
        "architecture": m.model.architecture,
        "threads": args.threads,
        "iters": args.iters,
        "batch": args.batch,
        "cpu": _cpu_name(),
        "split": fp32_m.get("split"),
        "n": fp32_m.get("n"),
        "accuracy": {"fp32": fp32_m.get("accuracy"), "int8": int8_m.get("accuracy")},
        "macro_f1": {"fp32": fp32_m.get("macro_f1"), "int8": int8_m.get("macro_f1")},
        "drop_points": {"accuracy": round(drop_acc, 3), "macro_f1": round(drop_f1, 3)},
        "quantization": dict(m.artifacts["int8"].quantization or {}),
        "speed": rows,
        "checks": checks,
        "notes": {k: v for k, v in notes.items() if k == "gate_passed"},
    }
    _print_table(result, tp)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    if not args.no_plot:
        print(f"chart: {_plot(result, tp, out.with_suffix('.png'))}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _print_table(r: dict[str, Any], tp: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{r['model']} ({r['architecture']}), {r['threads']} thread(s), {r['cpu']}")
    for col in ("engine", "batch 1 ms", f"batch {r['batch']} img/s", "file MB", "accuracy", "macro-F1"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    acc, f1 = r["accuracy"], r["macro_f1"]
    for name, row in r["speed"].items():
        key = "int8" if name == "ORT INT8" else ("fp32" if name in ("ORT FP32", "torch eager") else None)
        t.add_row(
            name,
            f"{row['latency_b1_ms']:.2f}",
            f"{row[tp]:.1f}",
            f"{(row['file_bytes'] or 0) / 1e6:.2f}",
            f"{acc[key]:.4f}" if key and acc.get(key) is not None else "-",
            f"{f1[key]:.4f}" if key and f1.get(key) is not None else "-",
        )
    c = Table(title="targets")
    for col in ("check", "value", "target", "met"):
        c.add_column(col)
    for name, chk in r["checks"].items():
        c.add_row(name, str(chk["value"]), chk["target"], "yes" if chk["met"] else "NO")
    console = Console(highlight=False)
    console.print(t)
    console.print(c)


def _plot(r: dict[str, Any], tp: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["speed"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(names, [r["speed"][n]["latency_b1_ms"] for n in names], color="#4c72b0")
    axes[0].set_ylabel("ms / image (batch 1)")
    axes[0].set_title("latency")
    axes[1].bar(names, [r["speed"][n][tp] for n in names], color="#55a868")
    axes[1].set_ylabel(f"images / s (batch {r['batch']})")
    axes[1].set_title("throughput")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(
        f"{r['model']}: FP32 acc {r['accuracy']['fp32']}, INT8 acc {r['accuracy']['int8']} ({r['threads']} thread(s))",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
