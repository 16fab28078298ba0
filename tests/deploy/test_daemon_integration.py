"""deploy against the real runtime daemon (`defectscope serve`), and a real Prometheus scraping it.

Station paths here are absolute temp paths (deploy.toml names the model store and
config dir) because the daemon reads its config literally; --root is not involved.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from deploy import MONITORING_DIR
from tests.conftest import require_tool
from tests.deploy.conftest import REPO, deploy, free_port, readyz

pytest.importorskip(
    "runtime.serving.daemon", reason="runtime.serving.daemon (defectscope serve) is not in this checkout yet"
)


def _nan_bundle(dest: Path, version: str):
    """A bundle that verifies (schema, checksums, graph I/O) but whose model outputs NaN: the daemon refuses it."""
    import onnx
    from onnx import numpy_helper

    from runtime.bundle.write import write_bundle
    from tests.factories import make_tiny_onnx, tiny_manifest

    path = make_tiny_onnx(dest.parent / f".src-{dest.name}" / "model.onnx")
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.name == "B":
            init.CopyFrom(numpy_helper.from_array(np.full(2, np.nan, np.float32), "B"))
    onnx.save(model, path)
    return write_bundle(dest, tiny_manifest(version=version), {"model.onnx": path})


class Station:
    """A station tree in tmp: deploy.toml, station config, replay camera, and the daemon process."""

    def __init__(self, tmp: Path, bundles, name: str = "line1"):
        import cv2

        self.tmp, self.name = tmp, name
        self.models = tmp / "models"
        self.etc = tmp / "etc"
        self.etc.mkdir()
        self.port = free_port()
        frames = tmp / "frames"
        frames.mkdir()
        for i, level in enumerate((30, 60, 200, 90)):
            cv2.imwrite(str(frames / f"f{i}.png"), np.full((40, 48), level, np.uint8))
        self.pid_file = tmp / f"{name}.pid"
        self.config = self.etc / f"{name}.toml"
        self.config.write_text(f"""
station = "{name}"
[model]
bundle = "{self.models}/tiny/current"
backend = "onnxruntime-cpu"
threads = 1
warmup_runs = 1
[publisher]
bind = ["tcp://127.0.0.1:{free_port()}"]
[metrics]
host = "127.0.0.1"
port = {self.port}
ready_max_frame_age_s = 5.0
[daemon]
pid_file = "{self.pid_file}"
[[cameras]]
id = "cam0"
source = "{frames}"
loop = true
fps = 10
""")
        # The station's reload command: the runtime's own `defectscope reload` (PID file from the config).
        self.deploy_config = self.etc / "deploy.toml"
        self.deploy_config.write_text(f"""
[install]
models_dir = "{self.models}"
config_dir = "{self.etc}"
[service]
reload_command = "{sys.executable} -m defectscope.cli reload --config {self.etc}/{{station}}.toml"
status_command = "true"
ready_timeout_s = 30
""")
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "daemon.log"

    def deploy(self, *args, check=0):
        return deploy(*args, "--root", "/", "--config", self.deploy_config, check=check)

    def start(self, timeout_s: float = 90.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "defectscope.cli", "serve", "--config", str(self.config)],
            cwd=REPO,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}"
            try:
                if readyz(self.port).get("ready"):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready in {timeout_s} s:\n{self.log.read_text()}")

    def served(self) -> str | None:
        return (readyz(self.port).get("model") or {}).get("version")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(timeout=30) == 0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def station(tmp_path, bundles):
    st = Station(tmp_path, bundles)
    st.deploy("install", bundles.archive("1.0.0"))
    st.start()
    yield st
    st.stop()


def test_install_reload_and_health_gate_with_the_real_daemon(station, bundles, tmp_path):
    assert station.served() == "1.0.0"
    r = station.deploy("install", bundles.archive("1.1.0"), "--reload", "--json").json()
    assert r["reloaded"]["line1"].startswith("ready") and station.served() == "1.1.0"

    # A bundle deploy accepts but the daemon refuses (NaN scores on its warm-up frame): the daemon keeps
    # serving 1.1.0 and counts a failed reload, so the health check fails at once (well before the
    # timeout) and deploy switches `current` back by itself.
    bad = _nan_bundle(tmp_path / "nan-bundle", "1.2.0")
    t0 = time.monotonic()
    r = station.deploy("install", bad.path, "--reload", "--timeout", "60", check=3)
    assert time.monotonic() - t0 < 45
    assert "serving tiny 1.1.0" in r.stderr and "FAILED reload" in r.stderr and "rolled back to 1.1.0" in r.stderr
    assert station.served() == "1.1.0"
    assert (station.models / "tiny/current").resolve().name == "1.1.0"
    assert "non-finite" in station.log.read_text()

    r = station.deploy("rollback", "--reload", "--json").json()
    assert r["version"] == "1.0.0" and station.served() == "1.0.0"
    status = station.deploy("status", "--json").json()
    (st,) = status["stations"]
    assert st["in_sync"] and st["readyz"]["model"]["version"] == "1.0.0"


def _prom_query(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_daemon_and_loads_the_rules(station, tmp_path, bundles):
    prometheus = require_tool("prometheus")
    port = free_port()
    cfg = tmp_path / "prom/prometheus.yml"
    (tmp_path / "prom/rules").mkdir(parents=True)
    (tmp_path / "prom/rules/defectscope.rules.yml").write_text(
        (MONITORING_DIR / "rules/defectscope.rules.yml").read_text()
    )
    # The shipped fleet config with a fast scrape and this station as the only target.
    cfg.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [rules/defectscope.rules.yml]
scrape_configs:
  - job_name: defectscope
    static_configs:
      - targets: ["127.0.0.1:{station.port}"]
        labels: {{station: line1}}
""")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'prom/data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prom.log", "w"),
    )
    try:
        deadline = time.monotonic() + 60
        result: list[dict] = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prom.log").read_text()
            try:
                result = _prom_query(port, 'defectscope_model_info{job="defectscope"}')
                frames = _prom_query(port, 'defectscope_frames_inferred_total{job="defectscope", camera="cam0"}')
                if result and frames and float(frames[0]["value"][1]) > 0:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert result, f"no defectscope_model_info scraped:\n{(tmp_path / 'prom.log').read_text()}"
        labels = result[0]["metric"]
        assert (labels["name"], labels["version"], labels["station"]) == ("tiny", "1.0.0", "line1")
        assert float(frames[0]["value"][1]) > 0
        up = _prom_query(port, 'up{job="defectscope"}')
        assert up[0]["value"][1] == "1"

        # The server loaded our rules, and a fleet rollout shows up as a new version in Prometheus.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as r:
            groups = json.loads(r.read())["data"]["groups"]
        assert {g["name"] for g in groups} == {"defectscope-recording", "defectscope-alerts"}
        assert all(rule["health"] != "err" for g in groups for rule in g["rules"])
        station.deploy("install", bundles.archive("1.1.0"), "--reload")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if [x for x in _prom_query(port, "defectscope_model_info") if x["metric"]["version"] == "1.1.0"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("Prometheus never saw version 1.1.0")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
