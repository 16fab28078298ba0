"""The inspection daemon: the pipeline plus its service surface, started and stopped as one.

``Daemon.start()`` loads the model (``runtime.inference.model``), opens HTTP (``runtime.serving.service``) and
ZeroMQ (``runtime.serving.publisher``), starts the pipeline threads (``runtime.serving.pipeline``), the
cameras (``runtime.sources.cameras``) and the systemd watchdog (``runtime.serving.notify``); ``run()`` serves
until SIGTERM or the end of every finite replay, then drains. SIGHUP (``request_reload``) swaps
the model without stopping the cameras; a bundle that fails to load, verify or warm up leaves
the old model serving (logged, ``defectscope_model_reloads_total{result="failure"}``,
``defectscope_model_reload_failed`` = 1 and ``last_reload`` in /readyz). The command lines
are ``runtime.serving.serve_cli`` (serve) and ``runtime.serving.reload_cli`` (reload).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from runtime.config.station import ConfigError, StationConfig, load_config
from runtime.inference.model import LoadedModel, ModelLoadError, load_model
from runtime.serving.device_health import DeviceHealth
from runtime.serving.messages import status_message
from runtime.serving.metrics import Metrics
from runtime.serving.notify import Notifier, Watchdog
from runtime.serving.pipeline import Pipeline
from runtime.serving.preview import PreviewEncoder
from runtime.serving.publisher import Publisher
from runtime.serving.service import HealthServer, PidFile, reload_record
from runtime.serving.snapshots import SnapshotSpool
from runtime.sources.cameras import Camera

log = logging.getLogger("defectscope.daemon")
# Sections a SIGHUP re-reads; the others need a restart.
RELOADED_SECTIONS = ("model", "tta", "decision")


class Daemon:
    """``start()``, then ``run()`` until stopped (signals) or replays end."""

    def __init__(
        self, cfg: StationConfig, config_path: str | os.PathLike[str] | None = None, notifier: Notifier | None = None
    ) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier or Notifier()
        self.metrics = Metrics([c.id for c in cfg.cameras])
        self.pipeline = Pipeline(cfg, self.metrics)
        self.pipeline.status = self.status_message
        self.pipeline.finished = self._finished
        self.state = "starting"
        self.started_mono = time.monotonic()
        self.cameras: list[Camera] = []
        self.publisher: Publisher | None = None
        self.http: HealthServer | None = None
        self.device_health: DeviceHealth | None = None
        self.snapshots: SnapshotSpool | None = None
        self.watchdog: Watchdog | None = None
        self.last_reload: dict[str, Any] = reload_record()
        self.pid_file = PidFile(cfg.daemon.pid_file)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reload_thread: threading.Thread | None = None
        self._closed = False
        self._switch_interval: float | None = None  # the interpreter's, restored at shutdown

    # The pipeline's state, as the tests and benchmarks read it.
    @property
    def model(self) -> LoadedModel | None:
        return self.pipeline.model

    @property
    def hub(self) -> Any:
        return self.pipeline.hub

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        return self.pipeline.counts_snapshot()

    def _finished(self, camera: str) -> bool:
        return any(c.cfg.id == camera and c.finished.is_set() for c in self.cameras)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model, open HTTP + ZeroMQ, start threads and cameras; then READY=1."""
        cfg = self.cfg
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(cfg.daemon.switch_interval_ms / 1000.0)  # see DaemonConfig.switch_interval_ms
        self.notifier.status("loading model")
        self._serve_model(load_model(cfg, 1))
        m = cfg.metrics
        self.http = HealthServer(
            m.host,
            m.port,
            self.metrics.render,
            self.readiness,
            self.liveness,
            timeout_s=m.http_timeout_s,
            max_connections=m.http_max_connections,
        )
        self.http.start()
        log.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)", m.host, self.http.port)
        self.device_health = DeviceHealth(cfg.device_health, self.metrics.device)
        self.device_health.start()
        self._open_publisher()
        if cfg.snapshots.enabled:
            self.snapshots = SnapshotSpool(cfg.snapshots, lambda r: self.metrics.snapshots.labels(r).inc())
            self.pipeline.snapshots = self.snapshots
        if cfg.preview.enabled:
            self.pipeline.preview = PreviewEncoder(cfg.preview, cfg.station)
        self.pid_file.write()
        self._wait_for_subscribers()
        self.pipeline.start()
        self._reload_thread = threading.Thread(target=self._reload_loop, name="reload", daemon=True)
        self._reload_thread.start()
        self.cameras = [Camera(c, self.pipeline.hub, self.pipeline, prepare=self.pipeline.prepare) for c in cfg.cameras]
        for cam in self.cameras:
            cam.start()
        self.state = "serving"
        self.pipeline.serving = True
        self.watchdog = Watchdog(self.notifier, self.progress, self.status_line)
        self.watchdog.start()
        self.notifier.ready(self.status_line())
        log.info("serving station %s with %d camera(s)", cfg.station, len(self.cameras))

    def _serve_model(self, model: LoadedModel) -> None:
        self.pipeline.model = model  # atomic swap: the next batch uses it
        info = model.info
        self.metrics.set_model(
            info["name"], info["version"], info["precision"], info["backend"], model.backend.inference_precision
        )
        log.info(
            "model %s %s (%s, artifact %s) on %s%s; %d frame(s) x %d view(s) per call",
            info["name"],
            info["version"],
            info["precision"],
            info["artifact"],
            info["backend"],
            f" ({reason})" if (reason := _backend_reason(model)) else "",
            model.frames_per_call,
            model.tta.n_views,
        )

    def _open_publisher(self) -> None:
        pub = self.cfg.publisher
        self.publisher = Publisher(pub, on_drop=lambda reason: self.metrics.subscribers_dropped.labels(reason).inc())
        self.pipeline.publisher = self.publisher
        log.info("publishing %s on %s", pub.format, ", ".join(self.publisher.endpoints))
        if pub.curve is None:
            exposed = [ep for ep in pub.bind if not _loopback(ep)]
            if exposed:
                log.warning(
                    "key 'publisher.bind': %s reachable from the network without CURVE: anyone there can "
                    "read the verdict stream (set [publisher.curve] or bind 127.0.0.1)",
                    ", ".join(exposed),
                )

    def _wait_for_subscribers(self) -> None:
        pub = self.cfg.publisher
        if not pub.wait_for_subscribers:
            return
        assert self.publisher is not None
        n = pub.wait_for_subscribers
        self.notifier.status(f"waiting for {n} subscriber(s)")
        log.info("waiting up to %.0fs for %d subscriber(s)", pub.wait_timeout_s, n)
        if not self.publisher.wait_for_subscribers(n, pub.wait_timeout_s, self._stop):
            log.warning("starting with %d of %d subscribers", self.publisher.subscriptions, n)

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def run(self) -> int:
        """Serve until stopped (SIGTERM) or every finite replay ended; then drain. Returns the exit code."""
        finite = bool(self.cameras) and all(c.cfg.finite for c in self.cameras)
        while not self._stop.is_set():
            if finite and self.cfg.daemon.exit_when_sources_end and all(c.finished.is_set() for c in self.cameras):
                log.info("all replays finished")
                break
            self._stop.wait(0.1)
        return self.shutdown()

    def shutdown(self) -> int:
        """Stop capture, drain queued frames through inference, publish them, close everything."""
        if self._closed:
            return 0
        self._closed = True
        self.state = "stopping"
        self.pipeline.serving = False  # cameras stopping now are not "down"
        self._stop.set()
        if self.watchdog:
            self.watchdog.stop()  # first, so no WATCHDOG=1 follows STOPPING=1
        self.notifier.stopping("draining")
        log.info("stopping: capture stopped, draining %d queued frame(s)", self.pipeline.hub.pending())
        for cam in self.cameras:
            cam.stop()
        for cam in self.cameras:
            if not cam.join(cam.cfg.read_timeout_s + 1.0):
                log.warning("camera %s: capture thread did not stop (blocked in the driver)", cam.cfg.id)
        self.pipeline.drain(self.cfg.daemon.drain_timeout_s, inferred=lambda: setattr(self, "state", "stopped"))
        self._reload.set()  # wake the reload thread so it sees _stop
        self._close_all()
        summary = ", ".join(
            f"{c}: {v['captured']} captured, {v['published']} published, {v['dropped']} dropped"
            for c, v in self.counts.items()
        )
        log.info("stopped (%s)", summary)
        self.notifier.close()
        return 0

    def _close_all(self) -> None:
        if self.publisher is not None:
            self.publisher.close(linger_s=2.0)
        if self.snapshots is not None:
            self.snapshots.close()
        if self.pipeline.model is not None:
            self.pipeline.model.close()
        if self.device_health is not None:
            self.device_health.stop()
        if self.http is not None:
            self.http.stop()
        self.pid_file.remove()
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)

    # ---- reload ----------------------------------------------------------------------------------
    def _reload_loop(self) -> None:
        while True:
            self._reload.wait()
            if self._stop.is_set():
                return
            self._reload.clear()
            try:
                self.reload()
            except Exception:  # the reload thread must survive anything a bundle does to it
                log.exception("reload crashed; still serving the previous model")

    def reload(self) -> bool:
        """Load the configured bundle and swap it in; on any failure the old model keeps serving."""
        old = self.pipeline.model
        assert old is not None
        self.notifier.reloading()
        self.notifier.status("reloading model")
        t0 = time.monotonic()
        try:
            cfg = self._reloaded_config()
            new = load_model(cfg, old.generation + 1)
        except (ModelLoadError, ConfigError) as exc:
            # The record before the counters: whoever sees the failure in /metrics finds its reason in /readyz.
            self.last_reload = reload_record("failed", str(exc), getattr(exc, "version", None))
            self.metrics.model_reloads.labels("failure").inc()
            self.metrics.reload_failed.set(1)
            log.error("reload failed; still serving %s %s: %s", old.info["name"], old.info["version"], exc)
            self.notifier.ready(f"reload failed: {exc}"[:200])
            return False
        self.cfg = cfg
        self._serve_model(new)
        self.last_reload = reload_record("ok", None, new.info["version"])
        self.metrics.model_reloads.labels("success").inc()
        self.metrics.reload_failed.set(0)
        log.info(
            "reloaded in %.2fs: %s %s -> %s %s",
            time.monotonic() - t0,
            old.info["name"],
            old.info["version"],
            new.info["name"],
            new.info["version"],
        )
        old.close()
        self.notifier.ready(self.status_line())
        return True

    def _reloaded_config(self) -> StationConfig:
        cfg = self.cfg
        if self.config_path is None:
            return cfg
        fresh = load_config(self.config_path)
        for f in dataclasses.fields(cfg):
            if (
                f.name not in RELOADED_SECTIONS
                and f.name not in ("source", "station")
                and getattr(fresh, f.name) != getattr(cfg, f.name)
            ):
                log.warning("reload: [%s] changed in %s; that takes effect on restart", f.name, self.config_path)
        return dataclasses.replace(cfg, **{s: getattr(fresh, s) for s in RELOADED_SECTIONS})

    # ---- health ----------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready = a model is loaded and serving; cameras that are down are reported, not fatal.

        ``deploy install --reload`` waits on ``model.version`` and must not roll back a good bundle
        because one camera is unplugged, so cameras do not decide the HTTP status.
        """
        now = time.monotonic()
        max_age = self.cfg.metrics.ready_max_frame_age_s
        model = self.pipeline.model
        cams: dict[str, dict[str, Any]] = {}
        for cam in self.cameras:
            age = None if cam.last_frame_at is None else now - cam.last_frame_at
            entry: dict[str, Any] = {
                "up": bool(cam.is_up and age is not None and age <= max_age),
                "last_frame_age_s": None if age is None else round(age, 3),
            }
            if cam.finished.is_set():
                entry["finished"] = True
            cams[cam.cfg.id] = entry
        for c in self.cfg.cameras:  # before the cameras started
            cams.setdefault(c.id, {"up": False, "last_frame_age_s": None})
        ready = model is not None and self.state == "serving"
        model_body = None
        if model is not None:
            model_body = dict(model.info)
            if reason := _backend_reason(model):
                model_body["backend_reason"] = reason
            model_body["inference_precision"] = model.backend.inference_precision
            if model.boot_fallback:
                model_body["boot_fallback"] = model.boot_fallback
            if (selection := getattr(model.backend, "selection", None)) is not None:
                model_body["selection"] = selection.to_dict()
        body = {
            "ready": ready,
            "state": self.state,
            "station": self.cfg.station,
            "model": model_body,
            "last_reload": dict(self.last_reload),
            "cameras": cams,
        }
        return ready, body

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        ok = self.state in ("starting", "stopping", "stopped") or self.progress()
        return ok, {"alive": ok, "state": self.state}

    def progress(self) -> bool:
        return self.pipeline.progress(self.cfg.daemon.stall_timeout_s)

    def status_message(self) -> dict[str, Any]:
        body = self.readiness()[1]
        for cam, counts in self.counts.items():
            body["cameras"][cam].update(counts)
        return status_message(
            station=self.cfg.station,
            state=self.state,
            model=body["model"],
            cameras=body["cameras"],
            subscribers=self.publisher.subscriptions if self.publisher else 0,
            uptime_s=time.monotonic() - self.started_mono,
            last_reload=self.last_reload,
            published_at=time.time(),
        )

    def status_line(self) -> str:
        model = self.pipeline.model
        up = sum(1 for c in self.cameras if c.is_up)
        published = sum(v["published"] for v in self.counts.values())
        m = (
            f"{model.info['name']} {model.info['version']} ({model.info['precision']}, {model.info['backend']})"
            if model
            else "no model"
        )
        return f"{self.state}: {m}; {up}/{len(self.cfg.cameras)} cameras up; {published} verdicts published"


def _backend_reason(model: LoadedModel) -> str | None:
    """Why this backend serves (runtime.inference.backends owns the choice and records it)."""
    selection = getattr(model.backend, "selection", None)
    return selection.summary() if selection is not None else None


def _loopback(endpoint: str) -> bool:
    """ipc:// and inproc:// stay on the host; tcp:// only on a loopback address or 'localhost'."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or '*': reachable from outside
