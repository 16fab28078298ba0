"""A stand-in station daemon for the demo's tests: verdicts over ZeroMQ, a /metrics counter that lags.

Its ``defectscope_frames_inferred_total`` reads 0 for the first ``--lag-scrapes`` scrapes, then
every verdict published: what a loaded machine shows when the subscriber is faster than the scrape.
Exits 0 on SIGTERM, as the real daemon does after draining.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.serving.messages import encode, verdict_message, verdict_topic  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--zmq-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--lag-scrapes", type=int, default=3)
    args = p.parse_args()
    import zmq

    state = {"published": 0, "scrapes": 0}
    lock = threading.Lock()

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            with lock:
                state["scrapes"] += 1
                value = state["published"] if state["scrapes"] > args.lag_scrapes else 0
            body = f'defectscope_frames_inferred_total{{camera="cam1"}} {value}.0\n'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", args.metrics_port), Metrics)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{args.zmq_port}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seq = 0
    while not stop.is_set():  # replays loop, like the demo's cameras
        msg = verdict_message(
            station="demo",
            camera="cam1",
            seq=seq,
            source=f"{seq % args.frames}.png",
            captured_at=time.time(),
            published_at=time.time(),
            model={"name": "tiny", "version": "1"},
            task="classification",
            scores={"ok": 1.0},
            top_class="ok",
            top_score=1.0,
            verdict="ok",
            defect_class=None,
            confidence=1.0,
            latency_ms={"total": 1.0},
            tta_views=1,
        )
        with lock:
            pub.send_multipart([verdict_topic("demo", "cam1", "ok").encode(), encode(msg)])
            state["published"] += 1
        seq += 1
        stop.wait(0.01)
    http.shutdown()
    pub.close(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
