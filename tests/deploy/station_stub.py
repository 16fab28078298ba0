"""A stand-in station daemon for deploy tests that need many cheap, fast-starting stations.

It speaks the runtime's service surface that deploy relies on (docs/contracts.md):
``/readyz`` JSON with the model it serves and the last reload's result (HTTP 200 when
the model is ready, even with a camera down; ``STUB_CAMERA_DOWN=1`` reports one down), ``/healthz``, ``/metrics`` with
``defectscope_model_info``, a PID file, and SIGHUP = reload the bundle named in the
station config with ``runtime.bundle.load.load_bundle`` (full verification), keeping the
old model when the new one is refused. The real daemon is exercised in
``test_daemon_integration.py``.

    python -m tests.deploy.station_stub --config ROOT/etc/defectscope/line1.toml --root ROOT --pid-file F
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from deploy.config import read_station, rooted
from runtime.bundle.load import load_bundle
from runtime.bundle.manifest import BundleError
from runtime.serving.metrics import MODEL_INFO_LABELS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--root", type=Path, default=Path("/"))
    p.add_argument("--pid-file", type=Path, required=True)
    args = p.parse_args(argv)

    station = read_station(args.config)
    bundle_path = rooted(args.root, station.bundle)
    registry = CollectorRegistry()
    # The runtime's label set (one home), so deploy tests see the daemon's series.
    info = Gauge("defectscope_model_info", "model", list(MODEL_INFO_LABELS), registry=registry)
    reloads = Counter("defectscope_model_reloads_total", "reloads", ["result"], registry=registry)
    state: dict = {"model": None, "last_reload": {"result": None, "error": None, "version": None}}
    lock = threading.Lock()
    camera_down = os.environ.get("STUB_CAMERA_DOWN") == "1"
    fail_reloads = os.environ.get("STUB_FAIL_RELOADS") == "1"  # as a daemon whose new backend cannot start

    def load() -> None:
        try:
            if fail_reloads and state["model"] is not None:
                raise BundleError("backend creation failed: out of GPU memory (stub)")
            bundle = load_bundle(bundle_path)
        except BundleError as exc:
            print(f"reload refused: {exc}", file=sys.stderr, flush=True)
            with lock:  # the record before the counter, as the daemon does (deploy reads both)
                state["last_reload"] = {"result": "failed", "error": str(exc), "version": None}
            reloads.labels("failure").inc()
            return
        m = bundle.manifest
        art = bundle.artifact()
        with lock:
            state["model"] = {
                "name": m.model.name,
                "version": m.model.version,
                "artifact": m.default_artifact,
                "precision": art.precision,
                "backend": "onnxruntime-cpu",
                "inference_precision": "f32",
            }
            info.clear()
            info.labels(m.model.name, m.model.version, art.precision, "onnxruntime-cpu", "f32").set(1)
            state["last_reload"] = {"result": "ok", "error": None, "version": m.model.version}
        reloads.labels("success").inc()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            with lock:
                model, last = state["model"], dict(state["last_reload"])
            if self.path == "/metrics":
                body, ctype, code = generate_latest(registry), "text/plain; version=0.0.4", 200
            else:
                model_ready = model is not None
                cameras = {"cam0": {"connected": not camera_down}}
                code = 200 if (model_ready or self.path == "/healthz") else 503
                body = json.dumps(
                    {"ready": model_ready and not camera_down, "model": model, "last_reload": last, "cameras": cameras}
                ).encode()
                ctype = "application/json"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer((station.metrics_host, station.metrics_port), Handler)
    server.daemon_threads = True
    # Reload in a worker thread: the signal handler must return quickly.
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=load, daemon=True).start())
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    load()
    tmp = args.pid_file.with_name(args.pid_file.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, args.pid_file)
    server.serve_forever(poll_interval=0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
