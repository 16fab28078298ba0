"""The demo's shared steps (both tasks): step banners, running a `defectscope` command in-process,
a station config for the replayed cameras, and the ZeroMQ + /metrics listener."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(title: str) -> float:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)
    return time.perf_counter()


def done(t0: float, what: str) -> None:
    print(f"--- {what} in {time.perf_counter() - t0:.1f} s", flush=True)


def run_cli(name: str, argv: list[str]) -> None:
    from defectscope.cli import resolve

    rc = resolve(name)(argv)
    if rc:
        raise SystemExit(f"demo: `defectscope {name} {' '.join(argv)}` failed with exit code {rc}")


def station_toml(
    out: Path,
    bundle: Path,
    zmq_port: int,
    metrics_port: int,
    cameras: list[str],
    threads: int,
    *,
    station: str = "demo",
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    decision: str = "[decision]\nuncertain_band = 0.1\n",
    comment: str = "two cameras replay the held-out ELPV cells in a loop",
) -> Path:
    """The demo's station config: each camera replays ``out/holdout/<camera>`` in a loop."""
    cams = "\n".join(
        f'[[cameras]]\nid = "{c}"\nsource = "{(out / "holdout" / c).resolve()}"\nloop = true\n' for c in cameras
    )
    text = f"""# Written by `defectscope demo`: {comment}.
station = "{station}"

[model]
bundle = "{bundle.resolve()}"
backend = "auto"
threads = {threads}

[batching]
max_batch = {max_batch}
max_wait_ms = {max_wait_ms}

[tta]
views = ["original"]

{decision}
[publisher]
bind = ["tcp://127.0.0.1:{zmq_port}"]
wait_for_subscribers = 1

[metrics]
host = "127.0.0.1"
port = {metrics_port}

[snapshots]
enabled = true
dir = "{(out / "snapshots").resolve()}"
quota_mb = 64

{cams}"""
    path = out / "station.toml"
    path.write_text(text)
    return path


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            return r.read().decode()
    except OSError:
        return None


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


FRAMES_INFERRED = "defectscope_frames_inferred_total"
METRICS_CATCH_UP_S = 30.0  # longest wait for /metrics to count the verdicts already received


def scrape_when_counted(
    port: int, at_least: int, daemon: subprocess.Popen, timeout_s: float = METRICS_CATCH_UP_S
) -> str:
    """/metrics once ``frames_inferred_total`` counts ``at_least`` frames (bounded wait; the last scrape otherwise).

    A subscriber can receive a verdict before the daemon's counter for it is scraped (on a loaded
    machine, seconds later): one scrape right after the stream under-counts.
    """
    deadline = time.monotonic() + timeout_s
    text = ""
    while True:
        text = scrape(port) or text
        counted = metric_sum(text, FRAMES_INFERRED)
        if counted >= at_least:
            return text
        if time.monotonic() > deadline or daemon.poll() is not None:
            print(
                f"  warning: /metrics counted {counted:.0f} inferred frames, fewer than the {at_least} verdicts "
                f"received, after waiting {timeout_s:.0f} s for the daemon's counter; reporting that figure",
                flush=True,
            )
            return text
        time.sleep(0.1)


def stream_first_verdicts(
    station: Path,
    zmq_port: int,
    metrics_port: int,
    expected: int,
    key: Callable[[dict], Any],
    out: Path,
    timeout_s: float = 600.0,
    command: list[str] | None = None,
) -> tuple[dict[Any, dict], int, str]:
    """Run ``defectscope serve`` on ``station`` (looping replays), keep the first verdict per ``key(msg)``
    until ``expected`` are in, scrape /metrics once it counts them, stop it with SIGTERM as systemd does.

    ``command`` replaces the serve command line (a stand-in daemon in tests).

    Returns ({key: first verdict}, messages received, the /metrics text).
    """
    import zmq

    from runtime.serving.messages import decode

    ctx: Any = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 1000)
    sub.connect(f"tcp://127.0.0.1:{zmq_port}")
    log = open(out / "serve.log", "w")
    argv = command or [sys.executable, "-m", "defectscope", "serve", "--config", str(station)]
    daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    first: dict[Any, dict] = {}
    received = 0
    deadline = time.monotonic() + timeout_s
    try:
        while len(first) < expected and time.monotonic() < deadline:
            try:
                _topic, payload = sub.recv_multipart()
            except zmq.Again:
                if daemon.poll() is not None:
                    break
                continue
            msg = decode(payload)
            if msg.get("type") != "verdict":
                continue
            received += 1
            first.setdefault(key(msg), msg)
            if received % 100 == 0:
                print(f"  received {len(first)}/{expected} held-out verdicts", flush=True)
        # Scrape while serving (once the counter has caught up with what was received), then stop the
        # line the way systemd does: SIGTERM drains and exits 0.
        metrics = scrape_when_counted(metrics_port, received, daemon)
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=30)
        sub.close(0)
        log.close()
    if rc != 0:
        raise SystemExit(f"demo: the daemon exited with {rc}; see {out / 'serve.log'}")
    return first, received, metrics
