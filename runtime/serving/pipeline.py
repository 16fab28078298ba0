"""The path of a frame: camera events in, micro-batches, one inference call, decision, verdicts out.

Threads (started by :meth:`Pipeline.start`)::

    camera-<id>   (runtime.sources.cameras.Camera) read -> rotate/ROI -> TTA views -> FrameHub
    batch         micro-batch across cameras, stack the views, one batch ahead of inference
    infer         ONE backend call for all frames x views -> postprocess -> decision
    output        snapshot spool, ZeroMQ publish, metrics, status heartbeats

Every wait is a blocking wait on a condition or queue (no thread polls in a busy loop),
and a batch waits for company only while inference is busy: with an idle engine a frame
goes to inference as soon as it is prepared (low-load latency = inference time).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.config.station import StationConfig
from runtime.inference.decision import Decision, Prediction, scores_dict, top
from runtime.inference.model import LoadedModel, release
from runtime.serving.batcher import BatchBuffers, FrameHub
from runtime.serving.messages import VERDICTS, status_topic, verdict_message, verdict_topic
from runtime.serving.metrics import Metrics
from runtime.serving.preview import PreviewEncoder
from runtime.serving.publisher import Publisher
from runtime.serving.snapshots import SnapshotSpool
from runtime.sources.cameras import Frame

log = logging.getLogger("defectscope.daemon")
_SENTINEL = object()
_TICK_S = 0.1  # longest a thread sleeps before it re-checks stop / drain (a blocking wait, not a spin)


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


def _counts() -> dict[str, int]:
    return {"captured": 0, "published": 0, "dropped": 0, "decode_errors": 0}


class Pipeline:
    """Frames from the cameras to verdicts on the publisher; the model is swapped by assigning ``model``."""

    def __init__(self, cfg: StationConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.hub = FrameHub()
        self.hub.on_depth = lambda cam, depth: metrics.queue_depth.labels(cam).set(depth)
        self.hub.on_drop = release  # a frame pushed out of its queue gives its arena slot back
        self.model: LoadedModel | None = None
        self.publisher: Publisher | None = None
        self.snapshots: SnapshotSpool | None = None
        self.preview: PreviewEncoder | None = None  # live JPEGs on their own topic; output thread only
        self.status: Callable[[], dict[str, Any]] | None = None  # the heartbeat message, built by the daemon
        self.serving = False  # cameras going down are logged only while serving
        self.finished: Callable[[str], bool] = lambda camera: False  # a finite replay ended (not "down")
        self.counts = {c.id: _counts() for c in cfg.cameras}
        self._counts_lock = threading.Lock()
        self._results: queue.Queue[Any] = queue.Queue(maxsize=256)
        self._batches: queue.Queue[Any] = queue.Queue(maxsize=1)  # stacked batches, one ahead of inference
        self._draining = threading.Event()
        self._infer_busy = threading.Event()  # set while a batch is in the backend
        self._buffers = BatchBuffers()  # the batch thread's stacking buffers (only it touches them)
        self._threads: dict[str, threading.Thread] = {}
        self._metric_children: dict[str, tuple[Any, Any, dict[str, Any]]] = {}
        self.heartbeat = time.monotonic()
        self.last_inferred = time.monotonic()

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
            if reason == "decode_error":
                self.counts[camera]["decode_errors"] += n

    def up(self, camera: str, up: bool) -> None:
        self.metrics.camera_up.labels(camera).set(1 if up else 0)
        if not up and self.serving and not self.finished(camera):
            log.warning("camera %s: down", camera)

    def reconnect_attempt(self, camera: str) -> None:
        self.metrics.reconnect_attempts.labels(camera).inc()

    def reconnected(self, camera: str) -> None:
        self.metrics.reconnects.labels(camera).inc()
        log.info("camera %s: reconnected", camera)

    def prepare(self, frame: Frame) -> None:
        model = self.model
        if model is not None:
            model.prepare(frame)

    def counts_snapshot(self) -> dict[str, dict[str, int]]:
        with self._counts_lock:
            return {cam: dict(c) for cam, c in self.counts.items()}

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for name, target in (("output", self._output_loop), ("infer", self._infer_loop), ("batch", self._batch_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            self._threads[name] = t
            t.start()
        self.heartbeat = self.last_inferred = time.monotonic()

    def drain(self, timeout_s: float, inferred: Callable[[], None] = lambda: None) -> bool:
        """After capture stopped: infer every queued frame, publish it, then a final status. True if done.

        ``inferred`` runs once inference is over, before the last results and the final status go out.
        """
        self._draining.set()
        self.hub.wake()
        deadline = time.monotonic() + timeout_s
        infer = self._threads.get("infer")
        done = True
        if infer is not None:
            infer.join(max(0.0, deadline - time.monotonic()))
            if infer.is_alive():
                log.error("drain timed out after %.0fs: %d frame(s) not inferred", timeout_s, self.hub.pending())
                done = False
        inferred()
        output = self._threads.get("output")
        if output is not None and output.is_alive():
            # FIFO: the output thread publishes every result ahead of the sentinel, then a final status.
            self._put_result(_SENTINEL, deadline + 1.0)
            output.join(max(1.0, deadline + 1.0 - time.monotonic()))
        if output is None or output.is_alive():
            self.send_status()
        return done

    def progress(self, stall_s: float) -> bool:
        """True while the pipeline moves: threads alive, the inference loop turning, queued frames inferred."""
        now = time.monotonic()
        if any(t is None or not t.is_alive() for t in (self._threads.get(n) for n in ("batch", "infer", "output"))):
            return False
        if now - self.heartbeat > stall_s:
            return False
        return not (self.hub.pending() > 0 and now - self.last_inferred > stall_s)

    def _put_result(self, item: Any, deadline: float) -> bool:
        while True:
            try:
                self._results.put(item, timeout=_TICK_S)
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
        while True:
            model = self.model
            assert model is not None
            frames = self.hub.get_batch(model.frames_per_call, self._batch_wait_s, timeout_s=_TICK_S)
            if not frames:
                if self._draining.is_set() and self.hub.pending() == 0:
                    self._hand_over(_SENTINEL)
                    return
                continue
            t_batch = time.monotonic()
            try:
                # No model lock here (inference holds it): preprocessing needs no backend, and the
                # inference thread stacks again if a reload replaced ``model`` meanwhile.
                batch = model.stack(frames, self._buffers)
            except Exception:  # the inference thread prepares again; never lose the frames here
                log.exception("stacking a batch of %d frame(s) failed", len(frames))
                batch = None
            if batch is not None:
                try:
                    model.backend.stage(batch)  # TensorRT: its copy to the GPU overlaps the running batch
                except Exception:  # run() copies it itself; never lose the frames here
                    log.exception("staging a batch of %d frame(s) on the device failed", len(frames))
            if not self._hand_over(_Batch(frames, batch, model, t_batch)):
                return

    def _batch_wait_s(self) -> float:
        """How long a batch whose first frame just arrived waits for company.

        Asked when the frame is there, not when the wait for it began: waiting only pays while
        the engine is busy NOW; an idle engine takes a lone frame at once (low-load latency).
        """
        return self.cfg.batching.max_wait_ms / 1000.0 if self._infer_busy.is_set() else 0.0

    def _hand_over(self, item: Any) -> bool:
        """Queue ``item`` for the inference thread; False if that thread is gone."""
        if item is not _SENTINEL:
            self._infer_busy.set()  # from now on the engine has work: the next batch may wait for company
        while True:
            try:
                self._batches.put(item, timeout=_TICK_S)
                return True
            except queue.Full:
                infer = self._threads.get("infer")
                if infer is not None and not infer.is_alive():
                    return False

    def _infer_loop(self) -> None:
        while True:
            try:
                item = self._batches.get(timeout=_TICK_S)
            except queue.Empty:
                item = None
            self.heartbeat = time.monotonic()
            if item is _SENTINEL:
                return
            if item is None:
                continue
            self._infer_busy.set()
            try:
                self._infer(item)
            except Exception:  # never let one bad batch kill the thread (the watchdog would restart us)
                log.exception("inference failed on a batch of %d frame(s)", len(item.frames))
                for f in item.frames:
                    release(f)
                    self.dropped(f.camera, "inference_error")
            finally:
                self._infer_busy.clear()

    def _acquire_model(self) -> LoadedModel:
        while True:
            model = self.model
            assert model is not None
            model.lock.acquire()
            if not model.closed:
                return model
            model.lock.release()  # swapped and closed under us: take the new one

    def _infer(self, item: _Batch) -> None:
        frames = item.frames
        model = self._acquire_model()
        try:
            batch = item.tensor
            if model is not item.model or batch is None:
                batch = model.stack(frames)  # stacked for the model a reload replaced (or not at all): redo
            t0 = time.perf_counter()
            try:
                outputs = model.backend.run(batch)
            except Exception as exc:
                log.error("inference failed (%s, %d frame(s)): %s", model.backend.name, len(frames), exc)
                for f in frames:
                    release(f)
                    self.dropped(f.camera, "inference_error")
                return
            n_views = model.tta.n_views
            if model.adaptive_band is None:
                preds = model.post(outputs, len(frames), n_views, [f.geometry for f in frames])
                views = [n_views] * len(frames)
            else:
                preds, views = _more_views(model, frames, outputs)
            infer_s = time.perf_counter() - t0
            decisions = [model.decider.decide(p) for p in preds]
        finally:
            model.lock.release()
        for f, v in zip(frames, views):
            f.tensor = None  # the (V,C,H,W) views are not needed past inference
            release(f)
            if v > 1 and model.adaptive_band is not None:
                self.metrics.tta_expanded.labels(f.camera).inc()
        self.metrics.inference_latency.observe(infer_s)
        self.metrics.batch_size.observe(len(frames))
        self.last_inferred = time.monotonic()
        self._put_result(_Result(frames, preds, decisions, model, item.t_batch, infer_s, views), float("inf"))

    # ---- output thread ----------------------------------------------------------------------------
    def _output_loop(self) -> None:
        interval = self.cfg.publisher.status_interval_s
        next_status = time.monotonic()
        while True:
            try:
                item = self._results.get(timeout=min(_TICK_S, interval) if interval else _TICK_S)
            except queue.Empty:
                item = None
            if item is _SENTINEL:
                self.send_status()
                return
            if item is not None:
                try:
                    self._publish(item)
                except Exception:  # a bad message must not stop the stream
                    log.exception("publishing a batch failed")
            if self.publisher is not None:  # subscriptions are applied (or refused) here, even when idle
                self.publisher.poll_subscriptions()
            now = time.monotonic()
            if interval and now >= next_status:
                self.send_status()
                next_status = now + interval

    def send_status(self) -> None:
        if self.publisher is None or self.publisher.sock is None or self.status is None:
            return
        if not self.publisher.send(status_topic(self.cfg.station), self.status()):
            self.metrics.publish_errors.inc()

    def _publish(self, r: _Result) -> None:
        cfg, pub = self.cfg, self.publisher
        assert pub is not None
        for frame, pred, dec, views in zip(r.frames, r.preds, r.decisions, r.views):
            msg = self._verdict(r, frame, pred, dec, views)
            if self.snapshots is not None and dec.verdict in cfg.snapshots.verdicts:
                path = self.snapshots.path_for(cfg.station, frame.camera, frame.seq, dec.verdict, frame.captured_at)
                if self.snapshots.submit(path, frame.image, dict(msg, snapshot=str(path))):
                    msg["snapshot"] = str(path)
            if pub.send(verdict_topic(cfg.station, frame.camera, dec.verdict), msg):
                with self._counts_lock:
                    self.counts[frame.camera]["published"] += 1
            else:
                self.metrics.publish_errors.inc()
            if (
                self.preview is not None
                and (got := self.preview.offer(frame.camera, frame.image, frame.seq, frame.captured_at)) is not None
            ):
                if not pub.send(*got):
                    self.metrics.publish_errors.inc()
            inferred, e2e, verdicts = self._camera_metrics(frame.camera)
            inferred.inc()
            verdicts[dec.verdict].inc()
            if dec.verdict == "defect" and dec.defect_class:
                self.metrics.defects.labels(frame.camera, dec.defect_class).inc()
            if pred.boxes is not None:  # a detector's frame
                self.metrics.detections_per_frame.labels(frame.camera).observe(len(dec.detections))
                for det in dec.detections:
                    self.metrics.detections.labels(frame.camera, det["class"]).inc()
            e2e.observe(time.monotonic() - frame.t_capture)

    def _verdict(self, r: _Result, frame: Frame, pred: Prediction, dec: Decision, views: int) -> dict[str, Any]:
        classes = r.model.classes
        top_class, top_score = top(classes, pred.scores)
        preprocess_ms = frame.preprocess_s * 1000.0
        latency = {
            "queue": max(0.0, (r.t_batch - frame.t_capture) * 1000.0 - preprocess_ms),
            "preprocess": preprocess_ms,
            "inference": r.infer_s * 1000.0,
            "total": (time.monotonic() - frame.t_capture) * 1000.0,
        }
        return verdict_message(
            station=self.cfg.station,
            camera=frame.camera,
            seq=frame.seq,
            source=frame.source,
            captured_at=frame.captured_at,
            published_at=time.time(),
            model=r.model.info,
            task=r.model.bundle.manifest.model.task,
            scores=scores_dict(classes, pred.scores),
            top_class=top_class,
            top_score=top_score,
            verdict=dec.verdict,
            defect_class=dec.defect_class,
            confidence=dec.confidence,
            latency_ms=latency,
            tta_views=views,
            detections=list(dec.detections),
        )

    def _camera_metrics(self, camera: str) -> tuple[Any, Any, dict[str, Any]]:
        """Per-camera metric children, looked up once (labels() costs a lock + dict lookup per call)."""
        cached = self._metric_children.get(camera)
        if cached is None:
            m = self.metrics
            cached = (
                m.frames_inferred.labels(camera),
                m.e2e_latency.labels(camera),
                {v: m.verdicts.labels(camera, v) for v in VERDICTS},
            )
            self._metric_children[camera] = cached
        return cached


def _more_views(model: LoadedModel, frames: list[Frame], outputs: Any) -> tuple[list[Prediction], list[int]]:
    """Adaptive TTA: first-view predictions; frames near a threshold get the other views in ONE call.

    Their score is the mean over all views, exactly what always-on TTA gives them.
    """
    n_views, band = model.tta.n_views, model.adaptive_band
    assert band is not None
    preds = model.post(outputs, len(frames), 1)
    near = [i for i, p in enumerate(preds) if model.decider.near(p.scores, band)]
    views = [1] * len(frames)
    if not near:
        return preds, views
    extra = []
    for i in near:
        f = frames[i]
        t = time.perf_counter()
        first = f.tensor[0] if f.tensor is not None and model.tta.views[0] == "original" else None
        extra.append(model.tta.expand(f.image, start=1, base=first, uint8=model.uint8_input))
        f.preprocess_s += time.perf_counter() - t
    rest = model.post(model.backend.run(np.concatenate(extra)), len(near), n_views - 1)
    for j, i in enumerate(near):
        preds[i] = Prediction(scores=(preds[i].scores + (n_views - 1) * rest[j].scores) / n_views)
        views[i] = n_views
    return preds, views
