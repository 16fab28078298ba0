"""bench_runtime.py's measuring side: the ZeroMQ subscriber process and the machine probes.

The subscriber runs in its own (spawned) process so that receiving never competes with the
daemon's threads for the GIL; it reports counts, sequence gaps and per-frame timings.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import time
from typing import Any


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subscriber_main(endpoint: str, ready: Any, conn: Any, max_s: float) -> None:
    """Receive until the daemon's final status; send back counts, gaps and per-frame timings."""
    import zmq

    from runtime.serving.messages import decode

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    sock.setsockopt_string(zmq.SUBSCRIBE, "")
    sock.connect(endpoint)
    ready.set()
    last_seq: dict[str, int] = {}
    gaps = 0
    received = 0
    lat_ms: list[float] = []
    inf_ms: list[float] = []
    verdicts: dict[str, tuple[str, int]] = {}  # "camera/source" -> (verdict, TTA views used)
    first_capture, last_publish = float("inf"), 0.0
    final = None
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        if not sock.poll(200):
            continue
        _topic, payload = sock.recv_multipart()
        msg = decode(payload)
        if msg.get("type") == "status":
            if msg.get("state") == "stopped":
                final = msg
                break
            continue
        received += 1
        cam, seq = msg["camera"], msg["seq"]
        if cam in last_seq and seq != last_seq[cam] + 1:
            gaps += seq - last_seq[cam] - 1
        last_seq[cam] = seq
        lat_ms.append(msg["latency_ms"]["total"])
        inf_ms.append(msg["latency_ms"]["inference"])
        verdicts[f"{cam}/{msg.get('source')}"] = (msg["verdict"], msg["tta_views"])
        first_capture = min(first_capture, msg["captured_at"])
        last_publish = max(last_publish, msg["published_at"])
    conn.send(
        {
            "received": received,
            "gaps": gaps,
            "latency_ms": lat_ms,
            "inference_ms": inf_ms,
            "verdicts": verdicts,
            "first_capture": first_capture,
            "last_publish": last_publish,
            "final": final,
        }
    )
    sock.close(0)
    ctx.term()


class SubscriberProcess:
    def __init__(self, endpoint: str, max_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.ready = ctx.Event()
        self.parent, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=subscriber_main, args=(endpoint, self.ready, child, max_s), daemon=True)
        self.proc.start()
        if not self.ready.wait(60):
            raise RuntimeError("subscriber process did not start")

    def result(self, timeout: float) -> dict[str, Any]:
        if not self.parent.poll(timeout):
            self.proc.kill()
            raise RuntimeError("subscriber did not report (no final status seen)")
        out = self.parent.recv()
        self.proc.join(5)
        return out
