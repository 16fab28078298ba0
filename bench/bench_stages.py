"""Where a frame's CPU time goes: the daemon's pipeline stages timed one by one, from outside the daemon.

Each stage is the runtime's own code, run on one thread in the order the daemon runs it:
decode (runtime.inference.preprocess.read_image), resize (Preprocessor.geometry: resize + crop),
normalize (the rest of Preprocessor.__call__), stack (runtime.serving.batcher.assemble over the
frames' (V,C,H,W) tensors), infer (the daemon's backend via runtime.inference.selection.create_backend),
JSON (runtime.serving.messages.encode of a verdict-shaped message), ZeroMQ (send on a PUB socket with
a connected SUB; the SUB is drained outside the timing). Python stages are timed with the
thread's CPU clock; infer and ZeroMQ with the process CPU clock (engine worker threads, the
ZeroMQ I/O thread). bench_runtime.py sets the daemon's measured CPU per frame beside the sum:
the difference is the daemon's own overhead (threads, queues, wake-ups, metrics, glue).

``zero_copy``: the [batching] zero_copy path instead: each frame is prepared straight into a slot of a
preallocated arena (runtime.serving.batcher.FrameSlots, the backend's host memory) and ``stack`` is
the view of consecutive slots. A uint8-input artifact (manifest ``input: uint8_nhwc``) has
``normalize`` = the copy of the resized frame only (the graph normalises). Before/after: run both.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("decode", "resize", "normalize", "stack", "infer", "json", "zeromq")


def profile_stages(model_cfg: Any, paths: list[Path], batch: int, zero_copy: bool = False) -> dict[str, Any]:
    """{stage: {"cpu_ms", "wall_ms"} per frame} over ``paths``, TTA off (a runtime.config.station.ModelConfig)."""
    import zmq

    from runtime.bundle.load import load_bundle
    from runtime.inference.model import release
    from runtime.inference.preprocess import UINT8_NHWC, Preprocessor, input_dtype, input_shape, read_image
    from runtime.inference.selection import create_backend
    from runtime.serving.batcher import FrameSlots, assemble
    from runtime.serving.messages import encode
    from runtime.sources.cameras import Frame

    bundle = load_bundle(model_cfg.bundle)
    pre = Preprocessor(bundle.manifest.input)
    backend = create_backend(bundle, model_cfg)
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    pub.setsockopt(zmq.SNDHWM, 1_000_000)
    sub.setsockopt(zmq.RCVHWM, 1_000_000)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.3)  # the subscription reaches the PUB
    cpu = dict.fromkeys(STAGES, 0.0)
    wall = dict.fromkeys(STAGES, 0.0)

    def timed(stage: str, fn: Any, *args: Any, clock: Any = time.thread_time) -> tuple[Any, float, float]:
        c, w = clock(), time.perf_counter()
        out = fn(*args)
        dc, dw = clock() - c, time.perf_counter() - w
        if stage:
            cpu[stage] += dc
            wall[stage] += dw
        return out, dc, dw

    kind = backend.input_kind
    shape = input_shape(pre.spec, kind)
    prepare = pre.frame_uint8 if kind == UINT8_NHWC else pre
    slots = FrameSlots(2 * batch, (1, *shape), input_dtype(kind), backend.allocate_host) if zero_copy else None
    try:
        backend.warmup(shape, 2, batch)
        for start in range(0, len(paths), batch):
            frames = []
            for k, p in enumerate(paths[start : start + batch]):
                image = timed("decode", read_image, p)[0]
                _, geo_c, geo_w = timed("resize", pre.geometry, image)
                slot = slots.acquire() if slots is not None else None
                dest = slots.arena[slot][0] if slots is not None and slot is not None else None
                # normalize = the whole Preprocessor call minus its geometry part (timed just above)
                tensor, full_c, full_w = timed("", lambda im=image, o=dest: prepare(im, out=o))
                cpu["normalize"] += max(0.0, full_c - geo_c)
                wall["normalize"] += max(0.0, full_w - geo_w)
                frames.append(
                    Frame(
                        camera="cam1",
                        seq=start + k,
                        image=image,
                        captured_at=time.time(),
                        t_capture=time.monotonic(),
                        source=p.name,
                        tensor=tensor[None],
                        slot=(slots, slot) if slots is not None and slot is not None else None,
                    )
                )
            stacked = timed("stack", assemble, frames, None, slots)[0]
            outputs = timed("infer", backend.run, stacked, clock=time.process_time)[0]
            detection = bundle.manifest.model.task == "detection"
            for i, f in enumerate(frames):
                # the message dict is built and encoded, as the daemon's _publish does per frame
                scores = np.zeros(len(bundle.manifest.classes)) if detection else outputs[0][i]
                payload = timed(
                    "json", lambda f=f, s=scores, d=detection: encode(_message(f, s, bundle.manifest.classes, d))
                )[0]
                timed("zeromq", pub.send_multipart, [b"bench.cam1.ok", payload], clock=time.process_time)
            while sub.poll(0):
                sub.recv_multipart()
            for f in frames:
                release(f)
    finally:
        backend.close()
        pub.close(0)
        sub.close(0)
        ctx.term()
    n = len(paths)
    out: dict[str, Any] = {s: {"cpu_ms": cpu[s] * 1000 / n, "wall_ms": wall[s] * 1000 / n} for s in STAGES}
    out["_meta"] = {
        "frames": n,
        "batch": batch,
        "backend": backend.name,
        "artifact": backend.artifact_key,
        "inference_precision": backend.inference_precision,
        "input": kind,
        "zero_copy": zero_copy,
        "batches": dict(slots.stats) if slots is not None else None,
    }
    return out


def _message(frame: Any, scores: np.ndarray, classes: Any, detection: bool = False) -> dict[str, Any]:
    """A message of the daemon's verdict shape (same fields, same rounding); detection: 3 boxes."""
    probs = {c: round(float(s), 5) for c, s in zip(classes, scores)}
    extra: dict[str, Any] = {}
    if detection:
        extra["detections"] = [{"box": [12.5, 40.25, 88.0, 120.75], "score": 0.9312, "class": classes[-1]}] * 3
    return {
        **extra,
        "schema_version": 2 if detection else 1,
        "type": "verdict",
        "station": "bench",
        "camera": frame.camera,
        "seq": frame.seq,
        "source": frame.source,
        "captured_at": round(frame.captured_at, 6),
        "published_at": round(time.time(), 6),
        "model": {"name": "m", "version": "1", "precision": "int8", "artifact": "int8", "backend": "b"},
        "task": "detection" if detection else "classification",
        "top_class": classes[0],
        "top_score": 0.5,
        "verdict": "ok",
        "defect_class": None,
        "confidence": 0.5,
        "latency_ms": {"queue": 0.1, "preprocess": 1.0, "inference": 3.0, "total": 5.0},
        "tta_views": 1,
        "snapshot": None,
        "probabilities": probs,
    }


def stage_table(stages: dict[str, Any], daemon_cpu_ms: float | None = None, skip: tuple[str, ...] = ()) -> str:
    """Per-frame table; with the daemon's measured CPU per frame, its overhead beyond the stages.

    ``skip``: stages the daemon did not run (``decode`` when the replay was preloaded).
    """
    shown = [s for s in STAGES if s not in skip]
    total = sum(stages[s]["cpu_ms"] for s in shown)
    lines = [f"{'stage':12} {'CPU ms/frame':>12} {'wall ms/frame':>13} {'CPU share':>9}"]
    for s in shown:
        v = stages[s]
        lines.append(f"{s:12} {v['cpu_ms']:12.3f} {v['wall_ms']:13.3f} {100 * v['cpu_ms'] / total:8.1f}%")
    lines.append(
        f"{'sum':12} {total:12.3f}" + (f"   (without {', '.join(skip)}: not run by the daemon)" if skip else "")
    )
    if daemon_cpu_ms is not None:
        lines.append(f"{'daemon':12} {daemon_cpu_ms:12.3f}   (measured: the whole daemon process per frame)")
        lines.append(f"{'overhead':12} {daemon_cpu_ms - total:12.3f}   (threads, queues, wake-ups, metrics, glue)")
    return "\n".join(lines)
