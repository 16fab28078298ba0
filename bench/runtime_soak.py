"""bench_runtime's soak mode: one configuration at full rate on a looping replay, the daemon's RSS
sampled every 5 s, the subscriber (separate process) counting messages and sequence gaps."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from subscriber import SubscriberProcess, free_port, rss_mb

TARGET_RSS_MB = 20.0  # RSS growth after warm-up over 10 minutes


def run_soak(args: argparse.Namespace, replay: Path, artifact: str, station: Callable[..., Any]) -> dict[str, Any]:
    """``station`` builds the daemon's config (bench_runtime.station)."""
    from runtime.serving.daemon import Daemon

    port = free_port()
    cameras = args.cameras[0]
    cfg = station(args, replay, artifact, args.tta[0], cameras, port, loop=True)
    sub = SubscriberProcess(f"tcp://127.0.0.1:{port}", max_s=args.soak + 600)
    d = Daemon(cfg)
    d.start()
    runner = threading.Thread(target=d.run, daemon=True)
    runner.start()
    warmup = min(60.0, args.soak * 0.1)
    t0 = time.monotonic()
    samples: list[tuple[float, float]] = []
    while time.monotonic() - t0 < args.soak:
        samples.append((time.monotonic() - t0, rss_mb()))
        time.sleep(min(5.0, max(0.1, args.soak - (time.monotonic() - t0))))
    samples.append((time.monotonic() - t0, rss_mb()))
    d.request_stop()
    runner.join(120)
    r = sub.result(120)
    published = sum(c["published"] for c in d.counts.values())
    base = next((m for t, m in samples if t >= warmup), samples[0][1])
    growth = max(m for t, m in samples if t >= warmup) - base if samples else float("nan")
    return {
        "duration_s": args.soak,
        "cameras": cameras,
        "artifact": artifact,
        "tta": args.tta[0],
        "published": published,
        "received": r["received"],
        "dropped_messages": published - r["received"],
        "seq_gaps": r["gaps"],
        "fps": r["received"] / args.soak,
        "rss_mb_start": samples[0][1],
        "rss_mb_after_warmup": base,
        "rss_mb_end": samples[-1][1],
        "rss_growth_mb": growth,
        "rss_samples": samples,
        "pass": growth <= TARGET_RSS_MB * max(1.0, args.soak / 600.0) + 1e-9
        and published == r["received"]
        and r["gaps"] == 0,
    }
