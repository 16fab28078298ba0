"""Bare inference engines on already-preprocessed tensors: the machine's limit the daemon is held to.

An engine spec names the engine, the bundle artifact and (OpenVINO) the inference precision:
``ort:int8``, ``ort:fp32``, ``ov:int8:bf16``, ``ov:fp32:f32``. Bare means as a user would run
the engine alone: ONNX Runtime with its default session options (spinning allowed) and
OpenVINO with its default hints, only the thread count (and OpenVINO's precision) set.
Used by bench_runtime.py (throughput, batch-1 latency) and bench_openvino_accuracy.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_ENGINES = "ort:fp32,ort:int8,ov:fp32:f32,ov:fp32:bf16,ov:int8:f32,ov:int8:bf16"


@dataclass
class Engine:
    label: str  # "ort:int8" / "ov:int8:bf16" (the precision OpenVINO actually runs)
    run: Callable[[np.ndarray], np.ndarray]  # (N,C,H,W) float32 -> first output
    close: Callable[[], None]


def parse_engines(text: str) -> list[tuple[str, str, str]]:
    """'ort:int8,ov:fp32:bf16' -> [(engine, artifact, precision)]; ValueError on a bad spec."""
    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        parts = spec.split(":")
        if parts[0] == "ort" and len(parts) == 2:
            out.append(("ort", parts[1], "f32"))
        elif parts[0] == "ov" and len(parts) in (2, 3) and (len(parts) == 2 or parts[2] in ("f32", "bf16")):
            out.append(("ov", parts[1], parts[2] if len(parts) == 3 else "f32"))
        else:
            raise ValueError(f"engine spec {spec!r}: expected ort:ARTIFACT or ov:ARTIFACT[:f32|bf16]")
    return out


def engine_label(backend: str, artifact: str, inference_precision: str | None) -> str:
    """The bare-engine label of a daemon's runtime backend: the same engine measured alone."""
    if backend.startswith("openvino"):
        return f"ov:{artifact}:{inference_precision or 'f32'}"
    return f"ort:{artifact}" if backend.startswith("onnxruntime") else f"{backend}:{artifact}"


def accuracy_verdicts(path: str) -> dict[str, bool | None]:
    """bench_openvino_accuracy.py's JSON -> {engine label: passed its accuracy target (None: the reference)}."""
    import json
    from pathlib import Path

    rows = json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
    out: dict[str, bool | None] = {}
    for r in rows:
        backend = "openvino" if r["backend"].startswith("openvino") else r["backend"]
        out[engine_label(backend, r["artifact"], r.get("inference_precision"))] = r.get("pass")
    return out


def have_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def open_engine(
    bundle: Any, engine: str, artifact: str, precision: str, threads: int, hint: str = "latency", requests: int = 1
) -> Engine:
    """A bare engine on ``bundle``'s artifact (a runtime.bundle.load.Bundle)."""
    path = str(bundle.artifact_path(artifact))
    output = bundle.manifest.output.names[0]
    if engine == "ort":
        from runtime.inference.ort_session import ort_session

        sess = ort_session(path, threads)
        name = sess.get_inputs()[0].name
        return Engine(f"ort:{artifact}", lambda x: sess.run([output], {name: x})[0], lambda: None)
    from runtime.inference.openvino import OpenVINOModel

    model = OpenVINOModel(path, [output], threads=threads, hint=hint, precision=precision, infer_requests=requests)
    return Engine(f"ov:{artifact}:{model.inference_precision}", lambda x: model.run(x)[0], model.close)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def throughput(engine: Engine, tensors: np.ndarray, batch: int, warmup: int = 3) -> dict[str, Any]:
    """frames/s over ``tensors`` (N,V,C,H,W) in calls of ``batch`` frames; p50/p99 per call; batch-1 p50."""
    batches = [
        np.ascontiguousarray(tensors[i : i + batch].reshape(-1, *tensors.shape[2:]))
        for i in range(0, len(tensors), batch)
    ]
    for b in batches[:warmup]:
        engine.run(b)
    times = []
    for b in batches:
        t = time.perf_counter()
        engine.run(b)
        times.append(time.perf_counter() - t)
    one = np.ascontiguousarray(tensors[0])  # (V,C,H,W): one frame's views
    single = []
    for _ in range(20):
        t = time.perf_counter()
        engine.run(one)
        single.append(time.perf_counter() - t)
    return {
        "engine": engine.label,
        "frames": len(tensors),
        "fps": len(tensors) / sum(times),
        "p50_ms": percentile(times, 50) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
        "batch1_p50_ms": percentile(single, 50) * 1000,
    }


def bare_engines(
    bundle: Any,
    specs: list[tuple[str, str, str]],
    tensors: np.ndarray,
    batch: int,
    threads: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Throughput of every available engine spec (missing artifacts / openvino are skipped, said so)."""
    results, seen = [], set()
    for engine, artifact, precision in specs:
        if artifact not in bundle.manifest.artifacts or bundle.manifest.artifacts[artifact].format != "onnx":
            log(f"note: no ONNX artifact {artifact!r} in the bundle; {engine}:{artifact} skipped")
            continue
        if engine == "ov" and not have_openvino():
            log(f"note: openvino is not installed; ov:{artifact}:{precision} skipped")
            continue
        e = open_engine(bundle, engine, artifact, precision, threads)
        try:
            if e.label in seen:  # bf16 asked for on a CPU without it runs f32: already measured
                continue
            seen.add(e.label)
            r = throughput(e, tensors, batch)
        finally:
            e.close()
        r["threads"] = threads
        results.append(r)
        log(
            f"bare {r['engine']:16} {threads} thread(s): {r['fps']:8.1f} frames/s  (batch {batch}: p50 "
            f"{r['p50_ms']:.2f} ms; one frame: p50 {r['batch1_p50_ms']:.2f} ms)"
        )
    return results
