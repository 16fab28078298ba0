"""The inspection daemon: ``defectscope serve --config station.toml`` (and ``reload``).

Threads and the path of a frame::

    camera-<id> (one per camera)   read -> rotate/ROI -> TTA views via the bundle's Preprocessor
        -> FrameHub (bounded per camera; drop-oldest for live cameras, block for replays)
    batch                          micro-batch across cameras (max_batch / max_wait), stack the
                                   views, one batch ahead of inference (the copy overlaps it)
    infer                          ONE backend call for all frames x views -> postprocess -> decision
    output                         snapshot spool, ZeroMQ publish, metrics, status heartbeats
    reload                         SIGHUP: load + validate + warm up the configured bundle, swap
    http, watchdog                 /metrics /healthz /readyz; systemd READY / WATCHDOG / STATUS

SIGTERM stops the cameras, drains every queued frame through inference, publishes
it and exits 0. SIGHUP swaps the model without stopping the cameras; a bundle
that fails to load, verify or warm up leaves the old model serving (logged,
counted in ``defectscope_model_reloads_total{result="failure"}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Backend, BackendError, create_backend
from runtime.bundle import Bundle, BundleError, load_bundle
from runtime.config import ConfigError, StationConfig, load_config
from runtime.decision import Decider, Decision, Postprocessor, Prediction, make_postprocessor, scores_dict, top
from runtime.messages import SCHEMA_VERSION, status_topic, verdict_topic
from runtime.metrics import HealthServer, Metrics
from runtime.notify import Notifier, Watchdog
from runtime.preprocess import Preprocessor, SpecError
from runtime.publisher import Publisher, PublisherError
from runtime.snapshots import SnapshotSpool
from runtime.batcher import FrameHub, assemble
from runtime.sources import Camera, Frame
from runtime.tta import TTA, TTAError

log = logging.getLogger("defectscope.daemon")
_SENTINEL = object()


class ModelLoadError(RuntimeError):
    """The configured bundle cannot be served; the message says which check failed."""


# ---- the model being served ---------------------------------------------------------------------
@dataclass
class LoadedModel:
    generation: int  # increases with every successful (re)load; frames remember theirs
    bundle: Bundle
    backend: Backend
    pre: Preprocessor
    tta: TTA
    post: Postprocessor
    decider: Decider
    frames_per_call: int
    info: dict[str, str]  # name, version, precision, artifact, backend
    adaptive_band: float | None = None  # adaptive TTA: the band; None: every view of every frame
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while the backend runs
    closed: bool = False

    @property
    def classes(self) -> tuple[str, ...]:
        return self.bundle.manifest.classes

    def prepare(self, frame: Frame) -> None:
        """Frame -> its TTA views (V,C,H,W), on the calling (capture) thread (adaptive TTA: the first only)."""
        t = time.perf_counter()
        frame.tensor = self.tta.expand(frame.image, stop=1 if self.adaptive_band is not None else None)
        frame.generation = self.generation
        frame.preprocess_s += time.perf_counter() - t

    def stack(self, frames: list[Frame]) -> np.ndarray:
        """Frames -> one (N*V,C,H,W) batch; frames prepared for another model generation are prepared again."""
        for f in frames:
            if f.generation != self.generation or f.tensor is None:
                self.prepare(f)  # queued before a reload: redo with this model's preprocessing
        return assemble(frames)

    def close(self) -> None:
        with self.lock:  # waits for an in-flight batch on this model
            self.closed = True
            self.backend.close()


def load_model(cfg: StationConfig, generation: int = 1) -> LoadedModel:
    """Load, verify, build the backend for and warm up the configured bundle; ModelLoadError if unusable."""
    try:
        bundle = load_bundle(cfg.model.bundle)
        m = bundle.manifest
        pre = Preprocessor(m.input)
        tta = TTA(cfg.tta.views, pre)
        post = make_postprocessor(m, tta.n_views)
        decider = Decider(m.classes, m.good_classes, cfg.decision)
        backend = create_backend(bundle, cfg.model)
    except (BundleError, BackendError, ConfigError, TTAError, SpecError, OSError) as exc:
        raise ModelLoadError(f"{cfg.model.bundle}: {exc}") from None
    try:
        per_call = cfg.batching.max_batch
        adaptive = cfg.tta.mode == "uncertain" and tta.n_views > 1
        # Tensors per frame in the largest call: adaptive TTA runs first views, then the other views.
        per_frame = max(1, tta.n_views - 1) if adaptive else tta.n_views
        if backend.max_batch:
            if backend.max_batch < per_frame:
                log.warning("the model takes batches of at most %d, fewer than the %d TTA views: views will run "
                            "in several calls", backend.max_batch, per_frame)
            per_call = max(1, min(per_call, backend.max_batch // per_frame))
        backend.warmup(m.input.shape, cfg.model.warmup_runs, per_call * tta.n_views)
        # One synthetic frame through the whole path: views, outputs and postprocessing must agree.
        probe = np.full((m.input.resize_size, m.input.resize_size, 3), 127, dtype=np.uint8)
        views = tta.expand(probe)
        preds = post(backend.run(views), 1, tta.n_views)
        if preds[0].scores.shape != (len(m.classes),):
            raise ModelLoadError(f"model outputs {preds[0].scores.shape[0]} class scores, manifest lists "
                                 f"{len(m.classes)} classes")
        if not np.all(np.isfinite(preds[0].scores)):
            raise ModelLoadError("model produced non-finite scores on the warm-up frame")
        decider(preds[0].scores)
    except ModelLoadError as exc:
        backend.close()
        raise ModelLoadError(f"{cfg.model.bundle}: {exc}") from None
    except Exception as exc:  # any backend failure on warm-up means the model must not serve
        backend.close()
        raise ModelLoadError(f"{cfg.model.bundle}: warm-up inference failed: {exc}") from None
    info = {"name": m.model.name, "version": m.model.version, "precision": backend.precision,
            "artifact": backend.artifact_key, "backend": backend.name}
    return LoadedModel(generation, bundle, backend, pre, tta, post, decider, per_call, info,
                       adaptive_band=cfg.tta.band if adaptive else None)


@dataclass
class _Batch:
    frames: list[Frame]
    tensor: np.ndarray | None  # (N*V,C,H,W) stacked for ``model``; None: stack again at inference
    model: LoadedModel
    t_batch: float  # monotonic, batch taken from the hub


@dataclass
class _Result:
    frames: list[Frame]
    preds: list[Prediction]
    decisions: list[Decision]
    model: LoadedModel
    t_batch: float  # monotonic, batch taken from the hub
    infer_s: float
    views: list[int]  # TTA views each frame was judged on


# ---- the daemon -------------------------------------------------------------------------------
class Daemon:
    """The pipeline; ``start()``, then ``run()`` until stopped (signals) or replays end."""

    def __init__(self, cfg: StationConfig, config_path: str | os.PathLike[str] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier or Notifier()
        self.metrics = Metrics([c.id for c in cfg.cameras])
        self.hub = FrameHub()
        self.hub.on_depth = lambda cam, depth: self.metrics.queue_depth.labels(cam).set(depth)
        self.model: LoadedModel | None = None
        self.state = "starting"
        self.started_mono = time.monotonic()
        self.counts = {c.id: {"captured": 0, "published": 0, "dropped": 0} for c in cfg.cameras}
        self._counts_lock = threading.Lock()
        self.cameras: list[Camera] = []
        self.publisher: Publisher | None = None
        self.http: HealthServer | None = None
        self.snapshots: SnapshotSpool | None = None
        self.watchdog: Watchdog | None = None
        self.last_reload: dict[str, Any] | None = None
        self._results: queue.Queue[Any] = queue.Queue(maxsize=256)
        self._batches: queue.Queue[Any] = queue.Queue(maxsize=1)  # stacked batches, one ahead of inference
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._draining = threading.Event()
        self._closed = False
        self._switch_interval: float | None = None  # the interpreter's, restored at shutdown
        self.heartbeat = time.monotonic()
        self.last_inferred = time.monotonic()
        self._threads: dict[str, threading.Thread] = {}
        self._metric_children: dict[str, tuple[Any, Any, dict[str, Any]]] = {}
        self._pid_written = False

    # ---- camera events (called from capture threads) ----------------------------------------------
    def captured(self, camera: str, at: float) -> None:
        self.metrics.frames_captured.labels(camera).inc()
        self.metrics.last_frame.labels(camera).set(at)
        with self._counts_lock:
            self.counts[camera]["captured"] += 1

    def dropped(self, camera: str, reason: str, n: int = 1) -> None:
        self.metrics.frames_dropped.labels(camera, reason).inc(n)
        with self._counts_lock:
            self.counts[camera]["dropped"] += n

    def up(self, camera: str, up: bool) -> None:
        self.metrics.camera_up.labels(camera).set(1 if up else 0)
        finished = any(c.cfg.id == camera and c.finished.is_set() for c in self.cameras)
        if not up and self.state == "serving" and not finished:
            log.warning("camera %s: down", camera)

    def reconnecting(self, camera: str) -> None:
        self.metrics.reconnects.labels(camera).inc()

    def _prepare(self, frame: Frame) -> None:
        model = self.model
        if model is not None:
            model.prepare(frame)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model, open HTTP + ZeroMQ, start threads and cameras; then READY=1."""
        cfg = self.cfg
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(cfg.daemon.switch_interval_ms / 1000.0)  # see DaemonConfig.switch_interval_ms
        self.notifier.status("loading model")
        self.model = load_model(cfg, 1)
        info = self.model.info
        self.metrics.set_model(info["name"], info["version"], info["precision"], info["backend"])
        log.info("model %s %s (%s, artifact %s) on %s; %d frame(s) x %d view(s) per call", info["name"],
                 info["version"], info["precision"], info["artifact"], info["backend"], self.model.frames_per_call,
                 self.model.tta.n_views)
        self.http = HealthServer(cfg.metrics.host, cfg.metrics.port, self.metrics, self.readiness, self.liveness)
        self.http.start()
        log.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)", cfg.metrics.host, self.http.port)
        self.publisher = Publisher(cfg.publisher)
        log.info("publishing %s on %s", cfg.publisher.format, ", ".join(self.publisher.endpoints))
        if cfg.snapshots.enabled:
            self.snapshots = SnapshotSpool(cfg.snapshots, lambda r: self.metrics.snapshots.labels(r).inc())
        self._write_pid()
        if cfg.publisher.wait_for_subscribers:
            n = cfg.publisher.wait_for_subscribers
            self.notifier.status(f"waiting for {n} subscriber(s)")
            log.info("waiting up to %.0fs for %d subscriber(s)", cfg.publisher.wait_timeout_s, n)
            if not self.publisher.wait_for_subscribers(n, cfg.publisher.wait_timeout_s, self._stop):
                log.warning("starting with %d of %d subscribers", self.publisher.subscriptions, n)
        for name, target in (("output", self._output_loop), ("infer", self._infer_loop), ("batch", self._batch_loop),
                             ("reload", self._reload_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            self._threads[name] = t
            t.start()
        for cam_cfg in cfg.cameras:
            cam = Camera(cam_cfg, self.hub, self, prepare=self._prepare)
            self.cameras.append(cam)
        for cam in self.cameras:
            cam.start()
        self.state = "serving"
        self.heartbeat = self.last_inferred = time.monotonic()
        self.watchdog = Watchdog(self.notifier, self.progress, self.status_line)
        self.watchdog.start()
        self.notifier.ready(self.status_line())
        log.info("serving station %s with %d camera(s)", cfg.station, len(self.cameras))

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
        self._stop.set()
        if self.watchdog:
            self.watchdog.stop()  # first, so no WATCHDOG=1 follows STOPPING=1
        self.notifier.stopping("draining")
        log.info("stopping: capture stopped, draining %d queued frame(s)", self.hub.pending())
        for cam in self.cameras:
            cam.stop()
        for cam in self.cameras:
            if not cam.join(cam.cfg.read_timeout_s + 1.0):
                log.warning("camera %s: capture thread did not stop (blocked in the driver)", cam.cfg.id)
        self._draining.set()
        self.hub.wake()
        deadline = time.monotonic() + self.cfg.daemon.drain_timeout_s
        infer = self._threads.get("infer")
        if infer is not None:
            infer.join(max(0.0, deadline - time.monotonic()))
            if infer.is_alive():
                log.error("drain timed out after %.0fs: %d frame(s) not inferred", self.cfg.daemon.drain_timeout_s,
                          self.hub.pending())
        self.state = "stopped"
        output = self._threads.get("output")
        if output is not None and output.is_alive():
            # FIFO: the output thread publishes every result ahead of the sentinel, then a final status.
            self._put_result(_SENTINEL, deadline + 1.0)
            output.join(max(1.0, deadline + 1.0 - time.monotonic()))
        self._reload.set()  # wake the reload thread so it sees _stop
        if self.publisher is not None:
            if output is None or output.is_alive():
                self._send_status()
            self.publisher.close(linger_s=2.0)
        if self.snapshots is not None:
            self.snapshots.close()
        if self.model is not None:
            self.model.close()
        if self.http is not None:
            self.http.stop()
        self._remove_pid()
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
        with self._counts_lock:
            summary = ", ".join(f"{c}: {v['captured']} captured, {v['published']} published, {v['dropped']} dropped"
                                for c, v in self.counts.items())
        log.info("stopped (%s)", summary)
        self.notifier.close()
        return 0

    def _put_result(self, item: Any, deadline: float) -> bool:
        while True:
            try:
                self._results.put(item, timeout=0.1)
                return True
            except queue.Full:
                if time.monotonic() > deadline:
                    return False

    # ---- batch + inference threads ----------------------------------------------------------------
    def _batch_loop(self) -> None:
        """Take micro-batches from the hub and stack their views, one batch ahead of inference.

        Stacking (N*V,C,H,W) is a memory copy of several MB; done here, on the other core, it
        overlaps the running inference call instead of adding to it.
        """
        wait_s = self.cfg.batching.max_wait_ms / 1000.0
        while True:
            model = self.model
            assert model is not None
            frames = self.hub.get_batch(model.frames_per_call, wait_s, timeout_s=0.1)
            if not frames:
                if self._draining.is_set() and self.hub.pending() == 0:
                    self._hand_over(_SENTINEL)
                    return
                continue
            t_batch = time.monotonic()
            try:
                # No model lock here (inference holds it): preprocessing needs no backend, and the
                # inference thread stacks again if a reload replaced ``model`` meanwhile.
                batch = model.stack(frames)
            except Exception:  # the inference thread prepares again; never lose the frames here
                log.exception("stacking a batch of %d frame(s) failed", len(frames))
                batch = None
            if not self._hand_over(_Batch(frames, batch, model, t_batch)):
                return

    def _hand_over(self, item: Any) -> bool:
        """Queue ``item`` for the inference thread; False if that thread is gone."""
        while True:
            try:
                self._batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                infer = self._threads.get("infer")
                if infer is not None and not infer.is_alive():
                    return False

    def _infer_loop(self) -> None:
        while True:
            try:
                item = self._batches.get(timeout=0.1)
            except queue.Empty:
                item = None
            self.heartbeat = time.monotonic()
            if item is _SENTINEL:
                return
            if item is None:
                continue
            try:
                self._infer(item)
            except Exception:  # never let one bad batch kill the thread (the watchdog would restart us)
                log.exception("inference failed on a batch of %d frame(s)", len(item.frames))
                for f in item.frames:
                    self.dropped(f.camera, "inference_error")

    def _infer(self, item: "_Batch") -> None:
        frames = item.frames
        while True:
            model = self.model
            assert model is not None
            model.lock.acquire()
            if not model.closed:
                break
            model.lock.release()  # swapped and closed under us: take the new one
        try:
            t_batch = item.t_batch
            batch = item.tensor
            if model is not item.model or batch is None:
                batch = model.stack(frames)  # stacked for the model a reload replaced (or not at all): redo
            t0 = time.perf_counter()
            try:
                outputs = model.backend.run(batch)
            except Exception as exc:
                log.error("inference failed (%s, %d frame(s)): %s", model.backend.name, len(frames), exc)
                for f in frames:
                    self.dropped(f.camera, "inference_error")
                return
            n_views = model.tta.n_views
            if model.adaptive_band is None:
                preds = model.post(outputs, len(frames), n_views)
                views = [n_views] * len(frames)
            else:
                preds, views = self._more_views(model, frames, outputs)
            infer_s = time.perf_counter() - t0
            decisions = [model.decider(p.scores) for p in preds]
        finally:
            model.lock.release()
        for f, v in zip(frames, views):
            f.tensor = None  # the (V,C,H,W) views are not needed past inference
            if v > 1 and model.adaptive_band is not None:
                self.metrics.tta_expanded.labels(f.camera).inc()
        self.metrics.inference_latency.observe(infer_s)
        self.metrics.batch_size.observe(len(frames))
        self.last_inferred = time.monotonic()
        self._put_result(_Result(frames, preds, decisions, model, t_batch, infer_s, views), float("inf"))

    @staticmethod
    def _more_views(model: LoadedModel, frames: list[Frame], outputs: Any) -> tuple[list[Prediction], list[int]]:
        """Adaptive TTA: first-view predictions; frames near a threshold get the other views in ONE call.

        Their score is the mean over all views, exactly what always-on TTA gives them.
        """
        n_views, band = model.tta.n_views, model.adaptive_band
        preds = model.post(outputs, len(frames), 1)
        near = [i for i, p in enumerate(preds) if model.decider.near(p.scores, band)]
        views = [1] * len(frames)
        if not near:
            return preds, views
        extra = []
        for i in near:
            f = frames[i]
            t = time.perf_counter()
            first = f.tensor[0] if model.tta.views[0] == "original" else None
            extra.append(model.tta.expand(f.image, start=1, base=first))
            f.preprocess_s += time.perf_counter() - t
        rest = model.post(model.backend.run(np.concatenate(extra)), len(near), n_views - 1)
        for j, i in enumerate(near):
            preds[i] = Prediction(scores=(preds[i].scores + (n_views - 1) * rest[j].scores) / n_views)
            views[i] = n_views
        return preds, views

    # ---- output thread ----------------------------------------------------------------------------
    def _output_loop(self) -> None:
        interval = self.cfg.publisher.status_interval_s
        next_status = time.monotonic()
        while True:
            try:
                item = self._results.get(timeout=0.1)
            except queue.Empty:
                item = None
            if item is _SENTINEL:
                self._send_status()
                return
            if item is not None:
                try:
                    self._publish(item)
                except Exception:  # a bad message must not stop the stream
                    log.exception("publishing a batch failed")
            now = time.monotonic()
            if interval and now >= next_status:
                assert self.publisher is not None
                self.publisher.poll_subscriptions()
                self._send_status()
                next_status = now + interval

    def _publish(self, r: _Result) -> None:
        cfg, pub = self.cfg, self.publisher
        assert pub is not None
        model = r.model
        classes = model.classes
        task = model.bundle.manifest.model.task
        for frame, pred, dec, views in zip(r.frames, r.preds, r.decisions, r.views):
            top_class, top_score = top(classes, pred.scores)
            now_wall, now_mono = time.time(), time.monotonic()
            preprocess_ms = frame.preprocess_s * 1000.0
            msg: dict[str, Any] = {
                "schema_version": SCHEMA_VERSION,
                "type": "verdict",
                "station": cfg.station,
                "camera": frame.camera,
                "seq": frame.seq,
                "source": frame.source,
                "captured_at": round(frame.captured_at, 6),
                "published_at": round(now_wall, 6),
                "model": dict(model.info),
                "task": task,
                "top_class": top_class,
                "top_score": round(top_score, 5),
                "verdict": dec.verdict,
                "defect_class": dec.defect_class,
                "confidence": round(dec.confidence, 5),
                "latency_ms": {
                    "queue": round(max(0.0, (r.t_batch - frame.t_capture) * 1000.0 - preprocess_ms), 3),
                    "preprocess": round(preprocess_ms, 3),
                    "inference": round(r.infer_s * 1000.0, 3),
                    "total": round((now_mono - frame.t_capture) * 1000.0, 3),
                },
                "tta_views": views,
                "snapshot": None,
            }
            scores = scores_dict(classes, pred.scores)
            if task == "classification":
                msg["probabilities"] = scores
            else:
                msg["class_scores"] = scores
                msg["detections"] = list(pred.detections or ())
            if self.snapshots is not None and dec.verdict in cfg.snapshots.verdicts:
                path = self.snapshots.path_for(cfg.station, frame.camera, frame.seq, dec.verdict, frame.captured_at)
                sidecar = dict(msg, snapshot=str(path))
                if self.snapshots.submit(path, frame.image, sidecar):
                    msg["snapshot"] = str(path)
            if pub.send(verdict_topic(cfg.station, frame.camera, dec.verdict), msg):
                with self._counts_lock:
                    self.counts[frame.camera]["published"] += 1
            else:
                self.metrics.publish_errors.inc()
            inferred, e2e, verdicts = self._camera_metrics(frame.camera)
            inferred.inc()
            verdicts[dec.verdict].inc()
            if dec.verdict == "defect" and dec.defect_class:
                self.metrics.defects.labels(frame.camera, dec.defect_class).inc()
            e2e.observe(now_mono - frame.t_capture)

    def _camera_metrics(self, camera: str) -> tuple[Any, Any, dict[str, Any]]:
        """Per-camera metric children, looked up once (labels() costs a lock + dict lookup per call)."""
        cached = self._metric_children.get(camera)
        if cached is None:
            m = self.metrics
            cached = (m.frames_inferred.labels(camera), m.e2e_latency.labels(camera),
                      {v: m.verdicts.labels(camera, v) for v in ("ok", "defect", "uncertain")})
            self._metric_children[camera] = cached
        return cached

    def _send_status(self) -> None:
        if self.publisher is None or self.publisher.sock is None:
            return
        body = self.readiness()[1]
        with self._counts_lock:
            for cam, counts in self.counts.items():
                body["cameras"][cam].update(counts)
        msg = {
            "schema_version": SCHEMA_VERSION,
            "type": "status",
            "station": self.cfg.station,
            "state": self.state,
            "published_at": round(time.time(), 6),
            "model": body["model"],
            "cameras": body["cameras"],
            "subscribers": self.publisher.subscriptions,
            "uptime_s": round(time.monotonic() - self.started_mono, 3),
            "last_reload": self.last_reload,
        }
        if not self.publisher.send(status_topic(self.cfg.station), msg):
            self.metrics.publish_errors.inc()

    # ---- reload thread ----------------------------------------------------------------------------
    def _reload_loop(self) -> None:
        while True:
            self._reload.wait()
            if self._stop.is_set():
                return
            self._reload.clear()
            self.reload()

    def reload(self) -> bool:
        """Load the configured bundle and swap it in; on any failure the old model keeps serving."""
        old = self.model
        assert old is not None
        self.notifier.reloading()
        self.notifier.status("reloading model")
        t0 = time.monotonic()
        try:
            cfg = self.cfg
            if self.config_path is not None:
                fresh = load_config(self.config_path)
                for section in ("cameras", "publisher", "metrics", "snapshots", "batching", "daemon"):
                    if getattr(fresh, section) != getattr(cfg, section):
                        log.warning("reload: [%s] changed in %s; that takes effect on restart", section,
                                    self.config_path)
                cfg = dataclasses.replace(cfg, model=fresh.model, tta=fresh.tta, decision=fresh.decision)
            new = load_model(cfg, old.generation + 1)
        except (ModelLoadError, ConfigError) as exc:
            self.metrics.model_reloads.labels("failure").inc()
            self.last_reload = {"result": "failure", "error": str(exc), "at": round(time.time(), 3)}
            log.error("reload failed; still serving %s %s: %s", old.info["name"], old.info["version"], exc)
            self.notifier.ready(f"reload failed: {exc}"[:200])
            return False
        self.cfg = cfg
        self.model = new  # atomic swap: the next batch uses the new model
        info = new.info
        self.metrics.set_model(info["name"], info["version"], info["precision"], info["backend"])
        self.metrics.model_reloads.labels("success").inc()
        self.last_reload = {"result": "success", "model": dict(info), "at": round(time.time(), 3)}
        log.info("reloaded in %.2fs: %s %s -> %s %s (%s, %s)", time.monotonic() - t0, old.info["name"],
                 old.info["version"], info["name"], info["version"], info["precision"], info["backend"])
        old.close()
        self.notifier.ready(self.status_line())
        return True

    # ---- health -----------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        max_age = self.cfg.metrics.ready_max_frame_age_s
        model = self.model
        ready = model is not None and self.state == "serving"
        cams: dict[str, dict[str, Any]] = {}
        active = 0
        for cam in self.cameras:
            age = None if cam.last_frame_at is None else now - cam.last_frame_at
            fresh = cam.is_up and age is not None and age <= max_age
            entry: dict[str, Any] = {"up": bool(fresh), "last_frame_age_s": None if age is None else round(age, 3)}
            if cam.finished.is_set():
                entry["finished"] = True
            else:
                active += 1
                ready = ready and fresh
            cams[cam.cfg.id] = entry
        for c in self.cfg.cameras:  # before the cameras started
            cams.setdefault(c.id, {"up": False, "last_frame_age_s": None})
        ready = ready and active > 0
        body = {"ready": bool(ready), "state": self.state, "station": self.cfg.station,
                "model": dict(model.info) if model is not None else None, "cameras": cams}
        return bool(ready), body

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        ok = self.state in ("starting", "stopping", "stopped") or self.progress()
        return ok, {"alive": ok, "state": self.state}

    def progress(self) -> bool:
        """True while the pipeline moves: threads alive, the inference loop turning, queued frames inferred."""
        now = time.monotonic()
        stall = self.cfg.daemon.stall_timeout_s
        for name in ("batch", "infer", "output"):
            t = self._threads.get(name)
            if t is None or not t.is_alive():
                return False
        if now - self.heartbeat > stall:
            return False
        if self.hub.pending() > 0 and now - self.last_inferred > stall:
            return False
        return True

    def status_line(self) -> str:
        model = self.model
        up = sum(1 for c in self.cameras if c.is_up)
        with self._counts_lock:
            published = sum(v["published"] for v in self.counts.values())
        m = f"{model.info['name']} {model.info['version']} ({model.info['precision']}, {model.info['backend']})" \
            if model else "no model"
        return f"{self.state}: {m}; {up}/{len(self.cfg.cameras)} cameras up; {published} verdicts published"

    # ---- pid file ---------------------------------------------------------------------------------
    def _write_pid(self) -> None:
        path = self.cfg.daemon.pid_file
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(f"{os.getpid()}\n")
            os.replace(tmp, path)
            self._pid_written = True
        except OSError as exc:  # serving matters more than `defectscope reload --config` working
            log.error("key 'daemon.pid_file': cannot write %s (%s); `defectscope reload --config` will not find "
                      "this process (systemctl reload / kill -HUP still work)", path, exc.strerror or exc)

    def _remove_pid(self) -> None:
        path = self.cfg.daemon.pid_file
        if path is None or not self._pid_written:
            return
        try:
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()
        except OSError:
            pass


# ---- command line -----------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps each line; elsewhere add the time.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="defectscope serve",
        description="Run the inspection daemon of one station: cameras in, verdicts out over ZeroMQ, "
                    "Prometheus metrics and health on HTTP. SIGTERM drains and exits 0; SIGHUP reloads the model "
                    "bundle named in the config (defectscope reload).",
    )
    p.add_argument("--config", required=True, help="station TOML (e.g. /etc/defectscope/line3.toml)")
    p.add_argument("--check", action="store_true",
                   help="validate the config, load + warm up the model, print the resolved config and exit")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                   help="override [daemon] log_level")
    return p


def main(argv: list[str] | None = None) -> int:
    """``defectscope serve``: exit 0 after a clean stop, 2 for a bad config, 1 when it cannot start."""
    args = serve_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"defectscope serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or cfg.daemon.log_level)
    if args.check:
        try:
            model = load_model(cfg)
        except ModelLoadError as exc:
            print(f"defectscope serve: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"config": cfg.to_dict(), "model": model.info,
                          "frames_per_call": model.frames_per_call, "tta_views": model.tta.n_views}, indent=2))
        model.close()
        return 0
    daemon = Daemon(cfg, config_path=args.config)
    interrupts = []

    def on_stop(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT:
            interrupts.append(signum)
            if len(interrupts) > 1:
                log.error("second interrupt: exiting without draining")
                os._exit(130)
        log.info("%s received: draining", signal.Signals(signum).name)
        daemon.request_stop()

    def on_hup(_signum: int, _frame: Any) -> None:
        log.info("SIGHUP received: reloading the model bundle")
        daemon.request_reload()

    previous = {sig: signal.signal(sig, handler)
                for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))}
    try:
        try:
            daemon.start()
        except (ModelLoadError, PublisherError, OSError) as exc:
            log.error("cannot start: %s", exc)
            daemon.shutdown()
            return 1
        return daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _read_reloads(url: str) -> dict[str, float] | None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out = {"success": 0.0, "failure": 0.0}
    for fam in text_string_to_metric_families(text):
        if fam.name == "defectscope_model_reloads":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels.get("result", "")] = s.value
    return out


def reload_main(argv: list[str] | None = None) -> int:
    """``defectscope reload``: SIGHUP the running daemon; with --wait, report whether the swap worked."""
    p = argparse.ArgumentParser(
        prog="defectscope reload",
        description="Ask a running daemon to reload the model bundle named in its config (SIGHUP). The old model "
                    "keeps serving if the new bundle is invalid. Exit 0 = signalled (or reloaded with --wait), "
                    "1 = reload failed, 3 = no answer within --wait seconds.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="station TOML: the pid comes from [daemon] pid_file, --wait uses [metrics]")
    g.add_argument("--pid", type=int, help="process id of the daemon")
    g.add_argument("--pid-file", help="file holding the daemon's pid")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for the result (needs --config or --metrics-url)")
    p.add_argument("--metrics-url", help="the daemon's /metrics URL (default: from the config's [metrics])")
    args = p.parse_args(argv)
    url = args.metrics_url
    if args.config:
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            print(f"defectscope reload: {exc}", file=sys.stderr)
            return 2
        if cfg.daemon.pid_file is None:
            print(f"defectscope reload: {args.config}: key 'daemon.pid_file' is not set; use --pid", file=sys.stderr)
            return 2
        pid_file: str | None = str(cfg.daemon.pid_file)
        if url is None:
            host = "127.0.0.1" if cfg.metrics.host in ("0.0.0.0", "", "::") else cfg.metrics.host
            host = f"[{host}]" if ":" in host else host
            url = f"http://{host}:{cfg.metrics.port}/metrics"
    else:
        pid_file = args.pid_file
    pid = args.pid
    if pid is None:
        assert pid_file is not None
        try:
            pid = int(Path(pid_file).read_text().strip())
        except (OSError, ValueError) as exc:
            print(f"defectscope reload: {pid_file}: no readable pid ({exc}); is the daemon running?", file=sys.stderr)
            return 1
    before = _read_reloads(url) if (url and args.wait > 0) else None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"defectscope reload: no process {pid}" + (f" (stale {pid_file})" if pid_file else ""), file=sys.stderr)
        return 1
    except PermissionError:
        print(f"defectscope reload: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    if args.wait <= 0:
        print(f"sent SIGHUP to {pid}")
        return 0
    if before is None:
        print(f"defectscope reload: sent SIGHUP to {pid}, but cannot read {url} to wait for the result",
              file=sys.stderr)
        return 3
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        now = _read_reloads(url)
        if now is not None:
            if now["failure"] > before["failure"]:
                print(f"reload of process {pid} FAILED; the previous model keeps serving (see its log)",
                      file=sys.stderr)
                return 1
            if now["success"] > before["success"]:
                print(f"process {pid} reloaded its model")
                return 0
        time.sleep(0.2)
    print(f"defectscope reload: no result from process {pid} within {args.wait:g}s", file=sys.stderr)
    return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
