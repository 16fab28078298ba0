#!/usr/bin/env python
"""Runtime daemon vs the fastest bare engine on the machine, per-stage CPU time, low-load latency, soak.

Headline (printed first in the summary): daemon frames/s / the FASTEST bare engine's frames/s
at the SAME total thread count (--total-threads, default all cores), TTA off, per artifact and
camera count. Bare engines (bench_engines.py, --engines): ONNX Runtime FP32/INT8 and OpenVINO
FP32/INT8 at f32 and bf16, each alone on already-preprocessed tensors. Target >= 0.85x, 0 lost.
--stages adds the per-frame CPU-time table (bench_stages.py: decode, resize, normalize, stack,
infer, JSON, ZeroMQ, and the daemon's own overhead = its measured CPU per frame - their sum).
--low-load FPS: one camera paced at FPS (a trigger-driven line); capture -> publish p50/p99;
target p50 <= the daemon's own inference time per frame + 3 ms.

Throughput mode (default): ELPV held-out images (test split of the reference protocol:
stratified 75/25 by class x cell type, seed 0; n=656) replayed through the full
daemon, in-process: PNG decode, preprocessing (the bundle's Preprocessor, on the
capture threads), micro-batched inference, decision, JSON publish to a real ZeroMQ
subscriber in a separate process, Prometheus metrics on. Compared with a bare ONNX
Runtime session (same artifact, same intra-op threads, same batch) fed the same images
already preprocessed. Per artifact (int8, fp32) x TTA (1 view, 3 views) x cameras
(1, 4, each replaying the whole set):

  frames/s            daemon: frames / (last publish - first capture), at the subscriber
                      bare:   frames / time of the session.run calls
  p50 / p99 latency   daemon: capture -> publish per frame (replays block rather than
                      drop, so this includes queueing at saturation); bare: per batch call
Targets: daemon >= 0.85x bare with TTA off; 3-view TTA costs <= 2.5x (1-view fps / 3-view fps).

Soak mode (--soak SECONDS): one configuration at full rate on a looping replay; RSS of
the daemon process sampled every 5 s; the subscriber (separate process, keeps up) counts
messages and sequence gaps per camera. Targets: RSS growth after warm-up <= 20 MB over
10 minutes, no dropped messages.

Usage (idle machine):
  python bench/bench_runtime.py --bundle runs/elpv-bundle --tta 1 --stages --low-load 20   # issue 18 table
  python bench/bench_runtime.py --bundle runs/elpv-bundle                       # -> bench/results/runtime.json
  python bench/bench_runtime.py --bundle B --soak 600 --artifacts int8           # 10-minute soak
  python bench/bench_runtime.py --bundle B --images DIR --limit 40 --artifacts fp32 --tta 1 --cameras 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_engines import engine_label, percentile  # noqa: E402  (bench/ is the script directory)
from runtime_args import TTA_BAND, TTA_MODE, TTA_VIEWS, heldout_images, parse_args, replay_dir  # noqa: E402, F401
from runtime_soak import TARGET_RSS_MB, run_soak  # noqa: E402
from subscriber import SubscriberProcess, cpu_model, free_port  # noqa: E402

TARGET_RATIO = 0.85
TARGET_LOW_LOAD_MS = 3.0  # low-load p50 may exceed the inference time by this much
TARGET_TTA_COST = 2.5


# ---- daemon runs -------------------------------------------------------------------------------
def station(
    args: argparse.Namespace,
    replay: Path,
    artifact: str,
    tta: str,
    cameras: int,
    port: int,
    loop: bool,
    fps: float | None = None,
) -> Any:
    from runtime.config.station import from_dict

    data = {
        "station": "bench",
        "model": {
            "bundle": str(Path(args.bundle).resolve()),
            "artifact": artifact,
            "backend": args.backend,
            "threads": args.threads,
            "warmup_runs": 3,
            "openvino": {"precision": args.ov_precision, "hint": args.ov_hint, "infer_requests": args.ov_requests},
        },
        "batching": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "zero_copy": args.zero_copy},
        "tta": {"views": TTA_VIEWS[tta], "mode": TTA_MODE[tta], "band": TTA_BAND},
        "publisher": {
            "bind": [f"tcp://127.0.0.1:{port}"],
            "wait_for_subscribers": 1,
            "wait_timeout_s": 60.0,
            "status_interval_s": 1.0,
            "sndhwm": 100_000,
        },
        "metrics": {"host": "127.0.0.1", "port": 0},
        "daemon": {"drain_timeout_s": 60.0},
        "cameras": [
            {
                "id": f"cam{i + 1}",
                "source": str(replay),
                "loop": loop,
                "queue_size": 2 * args.max_batch,
                **({"fps": fps} if fps else {}),
                **({"preload_mb": args.preload_mb} if args.preload_mb else {}),
            }
            for i in range(cameras)
        ],
    }
    return from_dict(data, where="bench")


def run_daemon(
    args: argparse.Namespace,
    replay: Path,
    n_images: int,
    artifact: str,
    tta: str,
    cameras: int,
    fps: float | None = None,
) -> dict[str, Any]:
    import resource

    from runtime.serving.daemon import Daemon

    port = free_port()
    cfg = station(args, replay, artifact, tta, cameras, port, loop=False, fps=fps)
    sub = SubscriberProcess(f"tcp://127.0.0.1:{port}", max_s=3600)
    d = Daemon(cfg)
    d.start()
    assert d.model is not None  # start() loaded it
    info = dict(d.model.info)
    selection = getattr(d.model.backend, "selection", None)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process = the daemon
    d.run()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    r = sub.result(120)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    frames = r["received"]
    span = r["last_publish"] - r["first_capture"]
    expected = n_images * cameras
    return {
        "frames": frames,
        "expected": expected,
        "gaps": r["gaps"],
        "fps": frames / span if span > 0 else float("nan"),
        "p50_ms": percentile(r["latency_ms"], 50),
        "p99_ms": percentile(r["latency_ms"], 99),
        "inference_p50_ms": percentile(r["inference_ms"], 50),
        "cpu_ms_per_frame": cpu_s * 1000 / max(1, frames),
        "backend": info["backend"],
        "precision": info["precision"],
        "inference_precision": getattr(selection, "inference_precision", None),
        "selection": selection.to_dict() if selection is not None else None,
        "verdicts": r["verdicts"],
        "expanded": sum(1 for _, views in r["verdicts"].values() if views > 1),
    }


def run_bare(args: argparse.Namespace, paths: list[Path], artifact: str, tta: str) -> dict[str, Any]:
    """A bare ORT session on already-preprocessed tensors (uint8 frames for a uint8-input artifact)."""
    import numpy as np

    from runtime.bundle.load import load_bundle
    from runtime.inference.ort_session import ort_session
    from runtime.inference.preprocess import UINT8_NHWC, Preprocessor, read_image
    from runtime.inference.tta import TTA

    b = load_bundle(args.bundle, check_graph=False)
    pre = Preprocessor(b.manifest.input)
    tta_views = TTA(tuple(TTA_VIEWS[tta]), pre)
    tensors = np.stack([tta_views.expand(read_image(p)) for p in paths])  # (N,V,C,H,W) float32
    if b.artifact(artifact).input == UINT8_NHWC:  # the exact uint8 frames, (N,V,H,W,C)
        u8 = pre.uint8_from_tensor(tensors.reshape(-1, *tensors.shape[2:]))
        tensors = u8.reshape(*tensors.shape[:2], *u8.shape[1:])
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if args.backend == "onnxruntime-cuda"
        else ["CPUExecutionProvider"]
    )
    sess = ort_session(b.artifact_path(artifact), args.total_threads, spin=False, providers=providers)
    name = sess.get_inputs()[0].name
    bs = args.max_batch
    batches = [tensors[i : i + bs].reshape(-1, *tensors.shape[2:]) for i in range(0, len(tensors), bs)]
    for batch in batches[:3]:
        sess.run(None, {name: batch})
    times = []
    for batch in batches:
        t = time.perf_counter()
        sess.run(None, {name: batch})
        times.append(time.perf_counter() - t)
    total = sum(times)
    return {
        "frames": len(paths),
        "fps": len(paths) / total,
        "p50_ms": percentile(times, 50) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
    }


# ---- throughput, headline, stages, low load ----------------------------------------------------
def bare_machine_limit(args: argparse.Namespace, bundle: Any, paths: list[Path]) -> list[dict[str, Any]]:
    """Every bare engine at --total-threads, TTA off, the median of --repeat runs; sorted fastest first.

    With --accuracy, each engine carries ``accurate``: whether it met its accuracy target on the
    held-out split (an engine that is fast but wrong is not the limit a station may run at).
    """
    import numpy as np
    from bench_engines import accuracy_verdicts, bare_engines, parse_engines

    from runtime.inference.preprocess import Preprocessor, read_image

    pre = Preprocessor(bundle.manifest.input)
    tensors = np.stack([pre(read_image(p))[None] for p in paths])  # (N,1,C,H,W)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeat):
        for r in bare_engines(bundle, parse_engines(args.engines), tensors, args.max_batch, args.total_threads):
            by_label.setdefault(r["engine"], []).append(r)
    verdicts = accuracy_verdicts(args.accuracy) if args.accuracy else {}
    runs = []
    for label, rs in by_label.items():
        r = median_run(rs)
        r["accurate"] = verdicts.get(label, None) is not False if args.accuracy else None
        runs.append(r)
    return sorted(runs, key=lambda r: -r["fps"])


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median frames/s (an actual run, so its other figures belong together)."""
    ordered = sorted(runs, key=lambda r: r["fps"])
    med = dict(ordered[(len(ordered) - 1) // 2])
    med["fps_all"] = [r["fps"] for r in runs]
    return med


def run_throughput(
    args: argparse.Namespace, artifacts: list[str], paths: list[Path], replay: Path, result: dict[str, Any]
) -> None:
    bare_cache: dict[tuple[str, str], dict[str, Any]] = {}
    header = (
        f"{'artifact':8} {'tta':>3} {'cams':>4} | {'daemon f/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU ms/f':>8} | {'bare ORT':>8} {'ratio':>5} | {'vs fastest':>10} {'lost':>4}"
    )
    print(header)
    print("-" * len(header))
    engines = result["bare_engines"]
    fastest = engines[0] if engines else None
    fastest_ok = next((e for e in engines if e.get("accurate") is not False), None)
    for art in artifacts:
        for tta in args.tta:
            # Adaptive TTA has no bare equivalent (its work depends on the scores): compared with always-on.
            key = (art, "3" if tta == "3a" else tta)
            if key not in bare_cache:
                bare_cache[key] = run_bare(args, paths, art, key[1])
            bare = bare_cache[key]
            for cams in args.cameras:
                dm = median_run([run_daemon(args, replay, len(paths), art, tta, cams) for _ in range(args.repeat)])
                ratio = dm["fps"] / bare["fps"]
                nan = float("nan")
                vs_fastest = dm["fps"] / fastest["fps"] if fastest and tta == "1" else nan
                # The same engine alone (backend, artifact, float precision): what the pipeline itself costs.
                label = engine_label(dm["backend"], art, dm["inference_precision"])
                same = next((e for e in engines if e["engine"] == label), None)
                verdicts = dm.pop("verdicts")
                result["runs"].append(
                    {
                        "artifact": art,
                        "tta": tta,
                        "cameras": cams,
                        "daemon": dm,
                        "bare": bare,
                        "ratio": ratio,
                        "ratio_vs_fastest": vs_fastest,
                        "daemon_engine": label,
                        "ratio_vs_fastest_accurate": dm["fps"] / fastest_ok["fps"]
                        if fastest_ok and tta == "1"
                        else nan,
                        "ratio_vs_same_engine": dm["fps"] / same["fps"] if same and tta == "1" else nan,
                        "_verdicts": verdicts,
                    }
                )
                print(
                    f"{art:8} {tta:>3} {cams:>4} | {dm['fps']:>10.1f} {dm['p50_ms']:>8.2f} {dm['p99_ms']:>8.2f} "
                    f"{dm['cpu_ms_per_frame']:>8.2f} | {bare['fps']:>8.1f} {ratio:>5.2f} | {vs_fastest:>10.2f} "
                    f"{dm['expected'] - dm['frames']:>4}"
                    + (f"   ({dm['expanded']} of {dm['frames']} frames got 3 views)" if tta == "3a" else ""),
                    flush=True,
                )


def run_low_load(args: argparse.Namespace, artifact: str, paths: list[Path], tmp: Path) -> dict[str, Any]:
    """One camera paced at --low-load frames/s: capture -> publish p50/p99 vs the daemon's inference time."""
    n = min(len(paths), max(20, int(args.low_load * args.low_load_s)))
    (tmp / "low-load").mkdir(exist_ok=True)
    replay = replay_dir(paths[:n], tmp / "low-load")
    dm = run_daemon(args, replay, n, artifact, "1", 1, fps=args.low_load)
    dm.pop("verdicts")
    target = dm["inference_p50_ms"] + TARGET_LOW_LOAD_MS
    dm.update(fps_offered=args.low_load, target_p50_ms=target, pass_=dm["p50_ms"] <= target)
    return dm


# ---- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "bench"))
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from runtime.bundle.load import load_bundle

    bundle = load_bundle(args.bundle)
    artifacts = [
        a
        for a in args.artifacts.split(",")
        if a in bundle.manifest.artifacts and bundle.manifest.artifacts[a].format == "onnx"
    ]
    missing = sorted(set(args.artifacts.split(",")) - set(artifacts))
    if missing:
        print(f"note: artifact(s) {missing} not in the bundle (or not ONNX); skipped")
    if not artifacts:
        raise SystemExit(f"no ONNX artifacts to run; the bundle has {sorted(bundle.manifest.artifacts)}")
    paths = heldout_images(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    replay = replay_dir(paths, tmp)
    if args.preload:
        from runtime.inference.preprocess import read_image

        # decoded size of the set (+ margin): frames of one replay are about the same size
        args.preload_mb = round(len(paths) * read_image(paths[0]).nbytes * 1.5 / 2**20 + 16, 1)
    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "total_threads": args.total_threads,
        "daemon_threads": args.threads,
        "max_batch": args.max_batch,
        "images": len(paths),
        "bundle": str(args.bundle),
        "preload": bool(args.preload),
        "repeat": args.repeat,
        "cpu": cpu_model(),
        "model": f"{bundle.manifest.model.name} {bundle.manifest.model.version}",
    }
    for lib in ("onnxruntime", "openvino"):
        try:
            env[lib] = __import__(lib).__version__
        except ImportError:
            pass
    result: dict[str, Any] = {"env": env, "headline": [], "bare_engines": [], "runs": [], "soak": None}

    if args.soak:
        soak = run_soak(args, replay, artifacts[0], station)
        result["soak"] = soak
        print(
            f"soak {soak['duration_s']:.0f}s ({soak['artifact']}, {soak['cameras']} camera(s)): "
            f"{soak['fps']:.1f} frames/s, RSS {soak['rss_mb_start']:.1f} -> {soak['rss_mb_end']:.1f} MB "
            f"(growth after warm-up {soak['rss_growth_mb']:+.1f} MB, target <= {TARGET_RSS_MB:g} MB / 10 min), "
            f"published {soak['published']}, received {soak['received']}, gaps {soak['seq_gaps']} "
            f"-> {'PASS' if soak['pass'] else 'FAIL'}"
        )
    else:
        result["bare_engines"] = bare_machine_limit(args, bundle, paths) if args.engines else []
        run_throughput(args, artifacts, paths, replay, result)
        if args.stages:
            from bench_stages import profile_stages, stage_table

            cfg = station(args, replay, artifacts[0], "1", 1, free_port(), loop=False).model
            # Before / after: the stacking copy, then [batching] zero_copy's arena (same artifact).
            result["stages"] = profile_stages(cfg, paths, args.max_batch)
            result["stages_zero_copy"] = profile_stages(cfg, paths, args.max_batch, zero_copy=True)
            one = next(
                (r for r in result["runs"] if r["tta"] == "1" and r["cameras"] == 1 and r["artifact"] == artifacts[0]),
                None,
            )
            result["stages_table"] = stage_table(
                result["stages"],
                one["daemon"]["cpu_ms_per_frame"] if one else None,
                skip=("decode",) if args.preload else (),
            )
            result["stages_zero_copy_table"] = stage_table(
                result["stages_zero_copy"], None, skip=("decode",) if args.preload else ()
            )
        if args.low_load:
            result["low_load"] = run_low_load(args, artifacts[0], paths, tmp)
        from bench_report import checks_for, headline, print_summary

        result["checks"] = checks_for(result, TARGET_RATIO, TARGET_TTA_COST)
        for r in result["runs"]:
            r.pop("_verdicts", None)
        result["headline"] = headline(args, result, TARGET_RATIO)
        print_summary(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
