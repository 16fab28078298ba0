"""`dataset export --from-console URL` against a hostile console: a real HTTP server process answering
traversal names (the console, or anyone on the plain-HTTP path, controls every string it returns)."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np

from tests.deploy.console.conftest import wait_for
from tests.deploy.console.test_dataset import _cli
from tests.factories import free_port

SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
rows, jpeg, log = json.load(open(sys.argv[2])), open(sys.argv[3], "rb").read(), open(sys.argv[4], "a")
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def _send(self, code, body, kind="application/json", extra=()):
        self.send_response(code)
        for k, v in extra: self.send_header(k, v)
        self.send_header("content-type", kind); self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._send(303, b"", extra=[("location", "/")])
    def do_GET(self):
        log.write(self.path + "\n"); log.flush()
        if self.path.startswith("/api/dataset"):
            self._send(200, json.dumps({"good_class": "ok", "rows": rows}).encode())
        elif self.path.startswith("/snapshots/"):
            self._send(200, jpeg, "image/jpeg")
        else:
            self._send(200, b"{}")
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _row(i: int, **over) -> dict:
    base = {
        "uid": f"u{i}",
        "station": "st1",
        "camera": "cam1",
        "seq": i,
        "source": None,
        "captured_at": 1.7e9 + i,
        "model_name": "m",
        "model_version": "1",
        "task": "classification",
        "verdict": "defect",
        "top_class": "crack",
        "defect_class": "crack",
        "confidence": 0.9,
        "boxes": None,
        "snapshot": f"s{i}.jpg",
        "review_action": "confirm",
        "review_label": None,
        "review_boxes": None,
        "review_user": "erik",
        "reviewed_at": 1.7e9 + 100,
    }
    return base | over


def test_export_from_a_hostile_console_never_writes_outside_out(tmp_path):
    rows = [
        _row(0, station="../../../outside/PWNED"),
        _row(1, uid="../../../../outside2/x"),
        _row(2, camera="/tmp/evil", station="..", uid=".."),
        _row(3, review_action="relabel", review_label="../../outside3"),
        _row(4, review_action="relabel", review_label="..\\..\\win"),
        _row(5, station="st1", camera="cam1", uid="ok5"),
    ]
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    (srv_dir / "rows.json").write_text(json.dumps(rows))
    cv2.imwrite(str(srv_dir / "a.jpg"), np.full((20, 30, 3), 128, np.uint8))
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVER,
            str(port),
            str(srv_dir / "rows.json"),
            str(srv_dir / "a.jpg"),
            str(srv_dir / "requests.log"),
        ]
    )
    try:
        import socket

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return True
            except OSError:
                return False

        wait_for(up, 15, "the hostile console to listen")
        out = tmp_path / "a" / "b" / "c" / "ds"
        r = _cli(
            "dataset",
            "export",
            "--from-console",
            f"http://127.0.0.1:{port}",
            "--user",
            "erik",
            "--out",
            str(out),
            env={"DEFECTSCOPE_CONSOLE_PASSWORD": "x"},
        )
    finally:
        server.terminate()
        server.wait(10)
    assert r.returncode == 0, r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and srv_dir not in p.parents]
    outside = [p for p in written if out not in p.parents]
    assert not outside, outside
    assert not (tmp_path / "a" / "outside").exists() and not (tmp_path / "outside2").exists()
    images = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert len(images) == 4 and all(i.startswith("crack/") and "/" not in i[len("crack/") :] for i in images), images
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["skipped"] == {"bad_label": 2}
    requested = (srv_dir / "requests.log").read_text().splitlines()
    snaps = [p for p in requested if p.startswith("/snapshots/")]
    assert len(snaps) == 4 and all(p.count("/") == 3 for p in snaps), snaps  # names quoted into one segment
