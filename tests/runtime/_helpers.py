"""Shared pieces of the runtime tests: tiny bundles, replay images, station configs, subscribers.

The tiny classifier's verdict follows image brightness (GlobalAveragePool ->
Flatten -> Gemm on (N,3,32,32), normalised with mean = std = 0.5): dark frames
are "ok", bright frames "defect", mid-gray "uncertain", so tests can predict
verdicts without hard-coding model outputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tests.factories import free_port

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32


def tiny_onnx(path: Path, gain: float = 3.0, static_batch: int | None = None) -> Path:
    """(N,3,32,32) -> logits (N,2) = [-g*m, +g*m], m = mean of the normalised input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    batch: Any = static_batch if static_batch else "N"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])
    w = np.array([[-gain / 3, gain / 3]] * 3, dtype=np.float32)  # (3, 2)
    b = np.zeros(2, dtype=np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [inp], [out], initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="defectscope-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def manifest_dict(version: str = "1.0.0", name: str = "tiny") -> dict[str, Any]:
    return {
        "schema_version": 1,
        "model": {
            "name": name,
            "version": version,
            "task": "classification",
            "architecture": "tiny_gap",
            "created": "2024-01-01T00:00:00Z",
        },
        "classes": ["ok", "defect"],
        "good_classes": ["ok"],
        "input": {
            "name": "input",
            "height": SIZE,
            "width": SIZE,
            "resize_size": SIZE,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
        "output": {"kind": "logits", "names": ["logits"]},
        "artifacts": {"fp32": {"file": "model.onnx", "format": "onnx", "precision": "fp32"}},
        "default_artifact": "fp32",
        "files": {},
    }


def make_bundle(
    dest: Path, version: str = "1.0.0", gain: float = 3.0, static_batch: int | None = None, name: str = "tiny"
) -> Path:
    from runtime.bundle.manifest import Manifest
    from runtime.bundle.write import write_bundle

    src = tiny_onnx(dest.parent / f".src-{dest.name}" / "model.onnx", gain, static_batch)
    manifest = Manifest.from_dict(manifest_dict(version, name))
    write_bundle(dest, manifest, {"model.onnx": src})
    return dest


def brightness(verdict: str) -> int:
    """A gray level the tiny model judges as ``verdict`` (gain 3, band 0.1)."""
    return {"ok": 40, "defect": 215, "uncertain": 128}[verdict]


def make_images(
    directory: Path, verdicts: list[str], size: tuple[int, int] = (40, 48), ext: str = ".png"
) -> list[Path]:
    """Replay images named in order, each a noisy gray frame judged as the given verdict."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, v in enumerate(verdicts):
        level = brightness(v)
        img = np.clip(level + rng.normal(0, 4, size), 0, 255).astype(np.uint8)
        p = directory / f"frame_{i:05d}{ext}"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def write_config(path: Path, sections: dict[str, Any], cameras: list[dict[str, Any]], station: str = "st1") -> Path:
    """A station TOML from dicts (sections: name -> table)."""
    lines = [f"station = {toml_value(station)}", ""]
    for name, table in sections.items():
        lines.append(f"[{name}]")
        nested = {k: v for k, v in table.items() if isinstance(v, dict) and name != "decision"}
        for k, v in table.items():
            if k not in nested:
                lines.append(f"{k} = {toml_value(v)}")
        for k, v in nested.items():
            lines.append(f"[{name}.{k}]")
            lines += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
        lines.append("")
    for cam in cameras:
        lines.append("[[cameras]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in cam.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def station_config(
    tmp: Path,
    bundle: Path,
    cameras: list[dict[str, Any]],
    pub_port: int | None = None,
    metrics_port: int | None = None,
    **sections: dict[str, Any],
) -> tuple[Path, str]:
    """Config with sensible test defaults; returns (path, publisher endpoint)."""
    pub_port = pub_port or free_port()
    endpoint = f"tcp://127.0.0.1:{pub_port}"
    base: dict[str, Any] = {
        "model": {"bundle": str(bundle), "backend": "onnxruntime-cpu", "threads": 1, "warmup_runs": 1},
        "batching": {"max_batch": 4, "max_wait_ms": 2.0},
        "publisher": {"bind": [endpoint], "status_interval_s": 0.2},
        "metrics": {"host": "127.0.0.1", "port": metrics_port or free_port(), "ready_max_frame_age_s": 3.0},
        "daemon": {"pid_file": str(tmp / "daemon.pid"), "drain_timeout_s": 10.0},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return write_config(tmp / "station.toml", base, cameras), endpoint


class Subscriber:
    """A real ZeroMQ SUB socket collecting decoded messages (in the test's thread, via poll)."""

    def __init__(self, endpoint: str, topic: str = "", rcvhwm: int = 100_000, rcvbuf: int = 0) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if rcvbuf:
            self.sock.setsockopt(zmq.RCVBUF, rcvbuf)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.messages: list[tuple[str, dict[str, Any]]] = []

    def pump(self, timeout_s: float = 0.1) -> int:
        from runtime.serving.messages import decode

        n = 0
        if self.sock.poll(int(timeout_s * 1000)):
            import zmq

            while True:
                try:
                    topic, payload = self.sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.messages.append((topic.decode(), decode(payload)))
                n += 1
        return n

    def until(
        self,
        predicate: Callable[[Subscriber], bool],
        timeout_s: float,
        proc: subprocess.Popen | None = None,
        what: str = "condition",
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s}s waiting for {what}; {len(self.messages)} messages received"
                )
            if proc is not None and proc.poll() is not None:
                self.pump(0.2)
                if predicate(self):
                    return
                raise AssertionError(f"daemon exited with {proc.returncode} while waiting for {what}")
            self.pump(0.1)

    def verdicts(self, camera: str | None = None) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m.get("type") == "verdict" and (camera is None or m["camera"] == camera)]

    def statuses(self) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m.get("type") == "status"]

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text from a real HTTP scrape -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(url)
    assert status == 200, status
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, sample: str, /, **labels: str) -> float:
    return samples.get((sample, tuple(sorted(labels.items()))), 0.0)


def spawn_daemon(
    config: Path, env: dict[str, str] | None = None, extra: list[str] | None = None, preamble: str = ""
) -> subprocess.Popen:
    """`defectscope serve --config ...` as a real subprocess (stderr captured)."""
    code = preamble + "import sys; from defectscope.cli import main; sys.exit(main(sys.argv[1:]))"
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--config", str(config), *(extra or [])],
        cwd=str(ROOT),
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[int, str]:
    """SIGTERM (if running) and wait; returns (exit code, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"daemon did not exit within {timeout}s of SIGTERM:\n{err.decode()[-3000:]}") from None
    return proc.returncode, err.decode()


def wait_http(url: str, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
        try:
            http_get(url, timeout=1.0)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout_s}s")
