"""One command for a CUDA machine (a Jetson or an x86 NVIDIA host): ``make gpu-check``.

For the demo classifier (``make demo``: demo-out/bundle) and a detector bundle it

1. builds FP16 and INT8 TensorRT engines with ``defectscope build-engine`` (the INT8 build runs the
   station's accuracy gate itself; detectors get FP16 only: docs/contracts.md),
2. runs the accuracy gate of every engine on the bundle's held-out sample
   (``runtime.engine.gate.gate_backend``; detectors: reported as not gated on the station),
3. measures each engine bare (frames/s at ``--max-batch``) next to ONNX Runtime CUDA and CPU,
4. runs the daemon on each engine (``bench/bench_runtime.py``, one camera, preloaded frames),

then prints one table and writes the JSON (``--out``). Exit codes: 0 every build and gate passed,
1 a build, gate or daemon run failed, 2 bad arguments, 3 no CUDA device here (nothing was run; the
message says what is missing). Timing numbers are only meaningful on a quiet machine.

    python bench/gpu_check.py --classifier demo-out/bundle --detector demo-det-out/bundle
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
PRECISIONS = ("fp16", "int8")


def cuda_unavailable() -> str | None:
    """Why TensorRT cannot run here (no tensorrt, no pycuda, no CUDA device), or None."""
    from runtime.engine.meta import EngineUnavailableError, current_platform

    try:
        current_platform()
    except EngineUnavailableError as exc:
        return str(exc)
    if importlib.util.find_spec("pycuda") is None:
        return "pycuda is not installed (the TensorRT backend's CUDA binding: pip install pycuda)"
    return None


# ---- steps (CUDA machine) -----------------------------------------------------------------------
def build(bundle: Path, model: str, precision: str, work: Path, extra: list[str]) -> tuple[Path, dict[str, Any]]:
    """``defectscope build-engine`` into a copy of the bundle under ``work``; (copy, record)."""
    out = work / f"{model}-{precision}"
    argv = [sys.executable, "-m", "defectscope.cli", "build-engine", str(bundle), "--precision", precision]
    argv += ["--out", str(out), *extra]
    t = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return out, {"ok": proc.returncode == 0, "seconds": round(time.monotonic() - t, 1), "detail": " | ".join(tail)}


def gate(bundle: Path, key: str, task: str) -> dict[str, Any]:
    if task != "classification":
        return {"ok": None, "detail": "no station-side box gate (calibrate gates the detector's mAP)"}
    from runtime.bundle.load import load_bundle
    from runtime.engine.gate import EngineRejectedError, gate_backend
    from runtime.inference.tensorrt import TensorRTBackend

    b = load_bundle(bundle)
    backend = TensorRTBackend(b, key)
    try:
        report = gate_backend(b, backend)
    except EngineRejectedError as exc:
        return {"ok": None, "detail": str(exc).splitlines()[0]}
    finally:
        backend.close()
    return {"ok": report.passed, "drop_points": report.drop_points, "budget_points": report.budget_points}


def bare_fps(bundle: Path, backend: str, artifact: str, batch: int, seconds: float) -> dict[str, Any]:
    """Frames/s of one engine alone on random frames of its input (after warm-up)."""
    import numpy as np

    from runtime.bundle.load import load_bundle
    from runtime.config.types import ModelConfig
    from runtime.inference.preprocess import input_dtype, input_shape
    from runtime.inference.selection import create_backend

    b = load_bundle(bundle)
    try:
        eng = create_backend(
            b, ModelConfig(bundle=b.path, backend=backend, artifact=artifact, threads=os.cpu_count() or 1)
        )
    except Exception as exc:  # BackendError and friends: report, go on with the other engines
        return {"ok": False, "detail": str(exc).splitlines()[0]}
    try:
        shape = input_shape(b.manifest.input, eng.input_kind)
        n = min(batch, eng.max_batch or batch)
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n, *shape)).astype(input_dtype(eng.input_kind))
        eng.warmup(shape, 3, n)
        frames, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            eng.run(x)
            frames += n
        return {"ok": True, "fps": frames / (time.perf_counter() - t0), "batch": n}
    finally:
        eng.close()


def daemon_fps(bundle: Path, backend: str, artifact: str, images: Path, work: Path) -> dict[str, Any]:
    out = work / f"daemon-{bundle.name}-{artifact}.json"
    argv = [sys.executable, str(ROOT / "bench" / "bench_runtime.py"), "--bundle", str(bundle), "--images", str(images)]
    argv += ["--artifacts", artifact, "--backend", backend, "--tta", "1", "--cameras", "1", "--engines", ""]
    argv += ["--preload", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or not out.is_file():
        return {"ok": False, "detail": " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-2:])}
    runs = json.loads(out.read_text()).get("runs") or []
    return {"ok": bool(runs), "fps": runs[0]["daemon"]["fps"] if runs else None}


def synthetic_images(dest: Path, n: int = 64, size: int = 300) -> Path:
    import cv2
    import numpy as np

    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(dest / f"frame_{i:04d}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return dest


def check_model(model: str, bundle: Path, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from runtime.bundle.load import load_bundle

    m = load_bundle(bundle).manifest
    task = m.model.task
    onnx_default = m.default_artifact if m.artifacts[m.default_artifact].format == "onnx" else "fp32"
    entries: list[dict[str, Any]] = []
    precisions = PRECISIONS if task == "classification" else ("fp16",)
    extra = ["--input", "uint8"] if args.uint8 and any(k.endswith("-u8") for k in m.artifacts) else []
    for precision in precisions:
        key = f"trt-{precision}"
        built, rec = build(bundle, model, precision, work, extra)
        e: dict[str, Any] = {"model": model, "engine": key, "backend": "tensorrt", "build": rec}
        if rec["ok"]:
            e["gate"] = gate(built, key, task)
            e["bare"] = bare_fps(built, "tensorrt", key, args.max_batch, args.seconds)
            e["daemon"] = daemon_fps(built, "tensorrt", key, args.images, work)
        entries.append(e)
    for backend, artifact in (("onnxruntime-cuda", "fp32"), ("onnxruntime-cpu", onnx_default)):
        entries.append(
            {
                "model": model,
                "engine": f"{backend} {artifact}",
                "backend": backend,
                "bare": bare_fps(bundle, backend, artifact, args.max_batch, args.seconds),
            }
        )
    return entries


# ---- report (tested on CPU) ---------------------------------------------------------------------
def _fmt(step: dict[str, Any] | None, value: str | None = None) -> str:
    if step is None:
        return "-"
    if step.get("ok") is False:
        return "FAIL"
    if step.get("ok") is None:
        return "n/a"
    return value if value is not None else "ok"


def rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows: model, engine, build, gate, bare frames/s, x ORT CUDA, x ORT CPU, daemon frames/s."""
    ref: dict[tuple[str, str], float] = {}
    for e in entries:
        if e["backend"].startswith("onnxruntime") and (e.get("bare") or {}).get("ok"):
            ref[(e["model"], e["backend"])] = e["bare"]["fps"]
    out = []
    for e in entries:
        bare, gate_, daemon = e.get("bare"), e.get("gate"), e.get("daemon")
        fps = bare.get("fps") if bare and bare.get("ok") else None
        vs = []
        for b in ("onnxruntime-cuda", "onnxruntime-cpu"):
            r = ref.get((e["model"], b))
            vs.append(f"{fps / r:.2f}x" if fps and r else "-")
        g = None if gate_ is None else gate_
        drop = f"{g['drop_points']:+.2f} pts" if g and g.get("ok") is not None and "drop_points" in g else None
        out.append(
            [
                e["model"],
                e["engine"],
                _fmt(e.get("build"), f"ok {e['build']['seconds']:.0f}s" if e.get("build", {}).get("ok") else None),
                _fmt(g, drop),
                _fmt(bare, f"{fps:.1f}" if fps else None),
                *vs,
                _fmt(daemon, f"{daemon['fps']:.1f}" if daemon and daemon.get("fps") else None),
            ]
        )
    return out


HEADERS = ["model", "engine", "build", "gate", "bare fr/s", "x ORT CUDA", "x ORT CPU", "daemon fr/s"]


def table(entries: list[dict[str, Any]]) -> str:
    body = rows(entries)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(HEADERS)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(HEADERS), line(["-" * w for w in widths]), *(line(r) for r in body)])


def passed(entries: list[dict[str, Any]]) -> bool:
    """Every build, gate and daemon run that ran passed (n/a: not applicable, not a failure)."""
    return not any((e.get(s) or {}).get("ok") is False for e in entries for s in ("build", "gate", "daemon"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description="TensorRT engines, gates and speed on this CUDA machine")
    p.add_argument("--classifier", type=Path, default=ROOT / "demo-out" / "bundle", help="default: demo-out/bundle")
    p.add_argument("--detector", type=Path, help="a detection bundle (e.g. demo-det-out/bundle); skipped if absent")
    p.add_argument("--images", type=Path, help="replay images for the daemon runs (default: synthetic frames)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0, help="bare timing per engine (default 5)")
    p.add_argument("--uint8", action="store_true", help="build uint8-input engines where the bundle has -u8 twins")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = cuda_unavailable()
    if why is not None:
        print(f"gpu-check: no CUDA device: {why}. Nothing was run (exit {EXIT_NO_CUDA}).", file=sys.stderr)
        return EXIT_NO_CUDA
    models = {"classifier": args.classifier, **({"detector": args.detector} if args.detector else {})}
    missing = [f"{k}: {p}" for k, p in models.items() if not (Path(p) / "manifest.json").is_file()]
    if missing:
        print(f"gpu-check: not a bundle: {', '.join(missing)} (make demo writes demo-out/bundle)", file=sys.stderr)
        return EXIT_USAGE
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="defectscope-gpu-check-") as tmp:
        work = Path(tmp)
        args.images = args.images or synthetic_images(work / "images")
        for model, bundle in models.items():
            entries += check_model(model, Path(bundle), args, work)
    from runtime.engine.meta import current_platform

    result = {"platform": current_platform().to_dict(), "entries": entries, "passed": passed(entries)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(table(entries))
    print(f"\n{'PASSED' if result['passed'] else 'FAILED'}; JSON: {args.out}")
    return EXIT_OK if result["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
