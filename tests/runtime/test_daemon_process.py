"""`defectscope serve` as a real subprocess: signals, reload, systemd notify, torch absent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ._helpers import (
    ROOT,
    Subscriber,
    free_port,
    http_get,
    make_bundle,
    make_images,
    metric,
    scrape,
    spawn_daemon,
    station_config,
    stop,
)

PATTERN = ["ok", "defect", "uncertain"]


def _point(link: Path, target: Path) -> None:
    """Atomically repoint a `current` symlink (what deploy does)."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, link)


def test_sigterm_drains_every_captured_frame_and_exits_0(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    make_images(tmp_path / "replay", PATTERN * 4)
    metrics_port = free_port()
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay"), "loop": True, "queue_size": 32}],
        metrics_port=metrics_port,
        publisher={"wait_for_subscribers": 1, "wait_timeout_s": 20.0},
        batching={"max_batch": 1, "max_wait_ms": 0.0},
    )
    sub = Subscriber(endpoint)
    proc = spawn_daemon(config)
    try:
        sub.until(lambda s: len(s.verdicts()) >= 30, 30, proc, what="30 verdicts")
        assert (tmp_path / "daemon.pid").read_text().strip() == str(proc.pid)
        code, err = stop(proc)
        assert code == 0, err[-3000:]
        sub.until(lambda s: any(m["state"] == "stopped" for m in s.statuses()), 10, what="final status")
        final = [m for m in sub.statuses() if m["state"] == "stopped"][-1]["cameras"]["cam1"]
        assert final["dropped"] == 0
        assert final["captured"] == final["published"]
        seqs = [m["seq"] for m in sub.verdicts()]
        assert seqs == list(range(final["published"]))  # every captured frame arrived, in order
        assert "SIGTERM received" in err and "stopped (cam1:" in err
        assert not (tmp_path / "daemon.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_sighup_swaps_model_and_corrupt_bundle_keeps_old_one_serving(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_bundle(models / "1.0.0", version="1.0.0", gain=3.0)
    make_bundle(models / "2.0.0", version="2.0.0", gain=-3.0)  # inverted: bright frames are now ok
    bad = models / "3.0.0"
    shutil.copytree(models / "2.0.0", bad)
    with open(bad / "model.onnx", "r+b") as fh:  # same size, different bytes: checksum mismatch
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x01\x02\x03")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["model"]["version"] = "3.0.0"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    current = models / "current"
    _point(current, models / "1.0.0")
    make_images(tmp_path / "replay", ["ok", "defect"])
    metrics_port = free_port()
    config, endpoint = station_config(
        tmp_path,
        current,
        [{"id": "cam1", "source": str(tmp_path / "replay"), "loop": True, "fps": 40.0}],
        metrics_port=metrics_port,
    )
    base = f"http://127.0.0.1:{metrics_port}"
    sub = Subscriber(endpoint)
    proc = spawn_daemon(config)

    def versions(msgs: list[dict]) -> list[str]:
        return [m["model"]["version"] for m in msgs]

    try:
        sub.until(lambda s: len(s.verdicts()) >= 4, 30, proc, what="first verdicts")
        assert set(versions(sub.verdicts())) == {"1.0.0"}
        assert {m["source"]: m["verdict"] for m in sub.verdicts()}["frame_00001.png"] == "defect"

        _point(current, models / "2.0.0")
        reload = subprocess.run(
            [sys.executable, "-m", "defectscope", "reload", "--config", str(config), "--wait", "30"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert reload.returncode == 0, reload.stderr
        sub.until(lambda s: "2.0.0" in versions(s.verdicts()), 20, proc, what="a 2.0.0 verdict")
        n = len(sub.verdicts())
        sub.until(lambda s: len(s.verdicts()) >= n + 4, 20, proc, what="more verdicts")
        after = [m for m in sub.verdicts() if m["model"]["version"] == "2.0.0"]
        assert {m["source"]: m["verdict"] for m in after}["frame_00001.png"] == "ok"  # the new weights judge
        seqs = [m["seq"] for m in sub.verdicts()]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # cameras kept going: no gap, no restart
        ready = json.loads(http_get(base + "/readyz")[1])
        assert ready["model"]["version"] == "2.0.0"
        assert ready["last_reload"]["result"] == "ok" and ready["last_reload"]["version"] == "2.0.0"
        assert ready["last_reload"]["error"] is None and ready["last_reload"]["at"] > time.time() - 60
        assert metric(scrape(base + "/metrics"), "defectscope_model_reload_failed") == 0

        _point(current, bad)
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while metric(scrape(base + "/metrics"), "defectscope_model_reloads_total", result="failure") < 1:
            assert time.monotonic() < deadline, "reload failure not counted"
            sub.pump(0.2)
        n = len(sub.verdicts())
        sub.until(lambda s: len(s.verdicts()) >= n + 6, 20, proc, what="verdicts after the failed reload")
        assert set(versions(sub.verdicts()[n:])) == {"2.0.0"}  # the old model keeps serving
        samples = scrape(base + "/metrics")
        assert metric(samples, "defectscope_model_reloads_total", result="success") == 1
        assert (
            metric(
                samples,
                "defectscope_model_info",
                name="tiny",
                version="2.0.0",
                precision="fp32",
                backend="onnxruntime-cpu",
                inference_precision="f32",
            )
            == 1
        )
        # The failure is visible where deploy and monitoring look, and the old model still counts as ready.
        status, body = http_get(base + "/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["ready"] is True and ready["model"]["version"] == "2.0.0"
        assert ready["last_reload"]["result"] == "failed" and "checksum mismatch" in ready["last_reload"]["error"]
        assert metric(samples, "defectscope_model_reload_failed") == 1
        sub.until(
            lambda s: any(m["last_reload"]["result"] == "failed" for m in s.statuses()),
            10,
            proc,
            what="a status heartbeat with the failed reload",
        )
        fail = subprocess.run(
            [sys.executable, "-m", "defectscope", "reload", "--config", str(config), "--wait", "30"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert fail.returncode == 1 and "FAILED" in fail.stderr
        code, err = stop(proc)
        assert code == 0
        assert "checksum mismatch" in err and "still serving tiny 2.0.0" in err
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_systemd_notify_protocol_on_a_real_socket(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    make_images(tmp_path / "replay", PATTERN)
    config, _ = station_config(
        tmp_path, bundle, [{"id": "cam1", "source": str(tmp_path / "replay"), "loop": True, "fps": 30.0}]
    )
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    received: list[tuple[float, str]] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().split("\n"):
                received.append((time.monotonic(), line))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    proc = spawn_daemon(config, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})

    def seen(prefix: str) -> int:
        return sum(1 for _, line in received if line.startswith(prefix))

    try:
        deadline = time.monotonic() + 30
        while seen("WATCHDOG=1") < 3:
            assert time.monotonic() < deadline and proc.poll() is None, f"no watchdog pings: {received}"
            time.sleep(0.05)
        assert seen("READY=1") == 1
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while seen("READY=1") < 2:  # RELOADING=1 ... READY=1 brackets the reload
            assert time.monotonic() < deadline, f"no READY after reload: {received}"
            time.sleep(0.05)
        code, err = stop(proc)
        assert code == 0, err[-2000:]
        time.sleep(0.3)
    finally:
        done.set()
        listener.join(2)
        sock.close()
        if proc.poll() is None:
            proc.kill()
    lines = [line for _, line in received]
    first = {
        key: next(i for i, line in enumerate(lines) if line.startswith(key))
        for key in ("READY=1", "RELOADING=1", "STOPPING=1", "STATUS=")
    }
    assert first["READY=1"] < first["RELOADING=1"] < first["STOPPING=1"]
    assert any(line.startswith("MONOTONIC_USEC=") for line in lines)
    assert any("cameras up" in line for line in lines if line.startswith("STATUS="))
    assert not any(line == "WATCHDOG=1" for line in lines[first["STOPPING=1"] :])


def test_bad_config_refused_by_the_command_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "st.toml"
    config.write_text('[model]\nbundle = "b"\nbackend = "gpu"\n[[cameras]]\nid = "c"\nsource = "0"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope", "serve", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "key 'model.backend'" in proc.stderr and str(config) in proc.stderr


def test_corrupt_bundle_at_start_exits_1_naming_the_file(tmp_path: Path) -> None:
    from runtime.serving.serve_cli import main

    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "model.onnx").write_bytes(b"garbage")
    make_images(tmp_path / "replay", PATTERN)
    config, _ = station_config(tmp_path, bundle, [{"id": "cam1", "source": str(tmp_path / "replay")}])
    assert main(["--config", str(config)]) == 1


BLOCKER = r"""
import atexit, importlib.abc, json, sys
BLOCKED = ("torch", "torchvision", "training", "calibration", "onnx", "sklearn")
ATTEMPTS = []
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            ATTEMPTS.append(name)
            raise ImportError(f"{name} is blocked in this test (runtime must not need it)")
        return None
sys.meta_path.insert(0, _Block())
for mod in list(sys.modules):
    if mod.split(".")[0] in BLOCKED:
        del sys.modules[mod]
atexit.register(lambda: open(sys.argv[-1] + ".imports.json", "w").write(json.dumps(ATTEMPTS)))
import runtime, runtime.inference.backends, runtime.serving.batcher, runtime.bundle.manifest, runtime.config.station, runtime.serving.daemon, runtime.inference.decision, runtime.inference.model
import runtime.serving.pipeline, runtime.serving.service, runtime.serving.serve_cli, runtime.serving.reload_cli
import runtime.serving.messages, runtime.serving.metrics, runtime.serving.notify, runtime.inference.preprocess, runtime.serving.publisher, runtime.serving.snapshots
import runtime.sources.cameras, runtime.inference.tta, runtime.tools.viewer
"""


def test_runtime_imports_and_serves_with_torch_absent(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    make_images(tmp_path / "replay", PATTERN * 2)
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay")}],
        publisher={"wait_for_subscribers": 1, "wait_timeout_s": 20.0},
    )
    sub = Subscriber(endpoint)
    proc = spawn_daemon(config, preamble=BLOCKER)
    try:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-3000:]
        sub.until(lambda s: len(s.verdicts()) == 6, 10, what="6 verdicts")
        assert [m["verdict"] for m in sub.verdicts()] == PATTERN * 2
        attempts = json.loads(Path(str(config) + ".imports.json").read_text())
        assert attempts == [], f"runtime tried to import {attempts}"
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


@pytest.mark.parametrize("args", [["--help"]])
def test_commands_have_help(args: list[str]) -> None:
    for cmd in ("serve", "reload", "watch"):
        out = subprocess.run(
            [sys.executable, "-m", "defectscope", cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and f"defectscope {cmd}" in out.stdout


def test_serve_check_validates_and_prints_the_resolved_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime.serving.serve_cli import main

    bundle = make_bundle(tmp_path / "bundle")
    make_images(tmp_path / "replay", PATTERN)
    config, _ = station_config(
        tmp_path, bundle, [{"id": "cam1", "source": str(tmp_path / "replay")}], tta={"views": ["original", "vflip"]}
    )
    assert main(["--config", str(config), "--check"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["backend"] == "onnxruntime-cpu" and out["tta_views"] == 2
    assert out["config"]["cameras"][0]["kind"] == "directory"
    assert out["config"]["model"]["bundle"] == str(bundle)
    assert out["checks"] == {"metrics.port": "ok", "publisher.bind": "ok", "cameras[0].source": "ok"}


def test_serve_check_fails_on_busy_ports_and_sources_without_a_readable_frame(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from runtime.serving.serve_cli import main

    bundle = make_bundle(tmp_path / "bundle")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    (broken / "b.jpg").write_bytes(b"not a jpeg")
    make_images(tmp_path / "replay", PATTERN[:1])
    metrics_port = free_port()
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "good", "source": str(tmp_path / "replay")}, {"id": "bad", "source": str(broken), "loop": True}],
        metrics_port=metrics_port,
    )
    with socket.socket() as busy_http, socket.socket() as busy_zmq:
        busy_http.bind(("127.0.0.1", metrics_port))
        busy_http.listen()
        busy_zmq.bind(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])))
        busy_zmq.listen()
        assert main(["--config", str(config), "--check"]) == 1
    captured = capsys.readouterr()
    checks = json.loads(captured.out)["checks"]
    assert checks["cameras[0].source"] == "ok"
    assert "none of the 2 image files is readable" in checks["cameras[1].source"]
    assert f"cannot bind 127.0.0.1:{metrics_port}" in checks["metrics.port"]
    assert "publisher.bind" in checks["publisher.bind"]
    for key in ("metrics.port", "publisher.bind", "cameras[1].source"):
        assert f"key '{key}'" in captured.err
