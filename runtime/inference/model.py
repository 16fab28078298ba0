"""The model being served: load, verify, warm up and probe a bundle; prepare frames for it.

``load_model`` is what ``serve`` runs at start, on SIGHUP and for ``serve --check``; a
bundle that fails any step raises :class:`ModelLoadError` and never serves.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from runtime.bundle.load import Bundle, load_bundle
from runtime.bundle.manifest import BundleError
from runtime.bundle.store import choose_bootable
from runtime.config.station import ConfigError, StationConfig
from runtime.inference.backends import Backend, BackendError
from runtime.inference.decision import BoxDecider, Decider, Postprocessor, make_postprocessor
from runtime.inference.preprocess import UINT8_NHWC, Preprocessor, SpecError, input_dtype, input_shape
from runtime.inference.selection import create_backend
from runtime.inference.tta import TTA, TTAError
from runtime.serving.batcher import BatchBuffers, FrameSlots, assemble
from runtime.sources.cameras import Frame, FrameRejected

log = logging.getLogger("defectscope.daemon")


class ModelLoadError(RuntimeError):
    """The configured bundle cannot be served; the message says which check failed."""

    def __init__(self, message: str, version: str | None = None) -> None:
        super().__init__(message)
        self.version = version  # the bundle's model version when its manifest could be read


@dataclass
class LoadedModel:
    generation: int  # increases with every successful (re)load; frames remember theirs
    bundle: Bundle
    backend: Backend
    pre: Preprocessor
    tta: TTA
    post: Postprocessor
    decider: Decider | BoxDecider  # the task's policy (post.decider); .decide(Prediction) -> Decision
    frames_per_call: int
    info: dict[str, str]  # name, version, precision, artifact, backend
    min_frame_side: int = 1  # pixels; smaller frames are rejected (counted), never judged
    adaptive_band: float | None = None  # adaptive TTA: the band; None: every view of every frame
    boot_fallback: str | None = None  # at start: why an earlier store version serves instead of `current`
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while the backend runs
    closed: bool = False
    slots: FrameSlots | None = None  # [batching] zero_copy: the arena prepared frames are written into

    @property
    def uint8_input(self) -> bool:
        """The artifact takes resized uint8 frames (N,H,W,C); normalisation runs inside the graph."""
        return self.backend.input_kind == UINT8_NHWC

    @property
    def classes(self) -> tuple[str, ...]:
        return self.bundle.manifest.classes

    def prepare(self, frame: Frame) -> None:
        """Frame -> its TTA views (V,C,H,W), on the calling (capture) thread (adaptive TTA: the first only)."""
        h, w = frame.image.shape[:2]
        if min(h, w) < self.min_frame_side:
            raise FrameRejected(
                "too_small", f"{w}x{h} frame is smaller than key 'model.min_frame_side' ({self.min_frame_side} px)"
            )
        t = time.perf_counter()
        release(frame)  # a slot of an earlier model generation (prepared again after a reload)
        stop = 1 if self.adaptive_band is not None else None
        slot = self.slots.acquire() if self.slots is not None else None
        out = None
        if slot is not None:
            assert self.slots is not None
            out = self.slots.arena[slot]
            frame.slot = (self.slots, slot)
        frame.tensor = self.tta.expand(frame.image, stop=stop, uint8=self.uint8_input, out=out)
        frame.geometry = self.pre.box_geometry(h, w)  # boxes on the model input -> this frame's pixels
        frame.generation = self.generation
        frame.preprocess_s += time.perf_counter() - t

    def stack(self, frames: list[Frame], out: BatchBuffers | None = None) -> np.ndarray:
        """Frames -> one (N*V,C,H,W) batch (in a buffer of ``out`` if given); frames prepared for another
        model generation are prepared again."""
        for f in frames:
            if f.generation != self.generation or f.tensor is None:
                self.prepare(f)  # queued before a reload: redo with this model's preprocessing
        return assemble(frames, out, self.slots)

    def close(self) -> None:
        with self.lock:  # waits for an in-flight batch on this model
            self.closed = True
            self.backend.close()


def release(frame: Frame) -> None:
    """Give back the frame's arena slot (after inference, or when the frame is dropped) and its views."""
    if frame.slot is not None:
        slots, i = frame.slot
        frame.slot = None
        frame.tensor = None
        slots.release(i)


def make_slots(cfg: StationConfig, backend: Backend, per_call: int, rows: int, shape: tuple[int, ...]) -> FrameSlots:
    """The arena for [batching] zero_copy: room for every queued frame, one frame being prepared per camera
    and three batches (being filled, handed over, in the engine), so a slot is rarely missing."""
    n = sum(c.queue_size for c in cfg.cameras) + len(cfg.cameras) + 3 * per_call
    return FrameSlots(n, (rows, *shape), input_dtype(backend.input_kind), backend.allocate_host)


def _frames_per_call(cfg: StationConfig, backend: Backend, n_views: int, adaptive: bool) -> int:
    per_call = cfg.batching.max_batch
    # Tensors per frame in the largest call: adaptive TTA runs first views, then the other views.
    per_frame = max(1, n_views - 1) if adaptive else n_views
    if backend.max_batch:
        if backend.max_batch < per_frame:
            log.warning(
                "the model takes batches of at most %d, fewer than the %d TTA views: views will run in several calls",
                backend.max_batch,
                per_frame,
            )
        per_call = max(1, min(per_call, backend.max_batch // per_frame))
    return per_call


def _probe(bundle: Bundle, backend: Backend, tta: TTA, post: Postprocessor, decider: Decider | BoxDecider) -> None:
    """One synthetic frame through the whole path: views, outputs and postprocessing must agree."""
    m = bundle.manifest
    probe = np.full((m.input.resize_size, m.input.resize_size, 3), 127, dtype=np.uint8)
    geo = tta.pre.box_geometry(*probe.shape[:2])
    preds = post(backend.run(tta.expand(probe, uint8=backend.input_kind == UINT8_NHWC)), 1, tta.n_views, [geo])
    if preds[0].scores.shape != (len(m.classes),):
        raise ModelLoadError(
            f"model outputs {preds[0].scores.shape[0]} class scores, manifest lists {len(m.classes)} classes"
        )
    if not np.all(np.isfinite(preds[0].scores)):
        raise ModelLoadError("model produced non-finite scores on the warm-up frame")
    decider.decide(preds[0])


def load_model(cfg: StationConfig, generation: int = 1) -> LoadedModel:
    """Load, verify, build the backend for and warm up the configured bundle; ModelLoadError if unusable."""
    version = None
    # Only at start: a reload that fails must stay visible (last_reload), not silently fall back.
    boot = choose_bootable(cfg.model.bundle) if generation == 1 else None
    if boot is not None and boot.fell_back:
        log.warning("model store: %s", boot.reason)
    try:
        bundle = load_bundle(boot.path if boot is not None else cfg.model.bundle)
        m = bundle.manifest
        version = m.model.version
        pre = Preprocessor(m.input)
        tta = TTA(cfg.tta.views, pre)
        post = make_postprocessor(m, tta.views)
        decider = post.decider(cfg.decision)
        if cfg.tta.mode == "uncertain" and tta.n_views > 1 and not post.adaptive_tta:
            raise ConfigError(
                f"key 'tta.mode': 'uncertain' (adaptive TTA) is not supported for {m.model.task} "
                'bundles; use mode = "always"'
            )
    except (BundleError, ConfigError, TTAError, SpecError, OSError) as exc:
        raise ModelLoadError(f"{cfg.model.bundle}: {exc}", version) from None
    adaptive = cfg.tta.mode == "uncertain" and tta.n_views > 1

    def warm(candidate: Backend) -> None:
        # Run by create_backend on each candidate: in auto mode one that fails warm-up or the probe
        # falls through to the next backend instead of failing the load.
        per_call = _frames_per_call(cfg, candidate, tta.n_views, adaptive)
        try:
            candidate.warmup(input_shape(m.input, candidate.input_kind), cfg.model.warmup_runs, per_call * tta.n_views)
            _probe(bundle, candidate, tta, post, decider)
        except ModelLoadError:
            raise
        except Exception as exc:  # any backend failure on warm-up means this backend must not serve
            raise ModelLoadError(f"warm-up inference failed: {exc}") from None

    try:
        backend = create_backend(bundle, cfg.model, probe=warm)
    except (ModelLoadError, BackendError) as exc:
        raise ModelLoadError(f"{cfg.model.bundle}: {exc}", version) from None
    per_call = _frames_per_call(cfg, backend, tta.n_views, adaptive)
    info = {
        "name": m.model.name,
        "version": m.model.version,
        "precision": backend.precision,
        "artifact": backend.artifact_key,
        "backend": backend.name,
    }
    slots = None
    if cfg.batching.zero_copy:
        rows = 1 if adaptive else tta.n_views
        slots = make_slots(cfg, backend, per_call, rows, input_shape(m.input, backend.input_kind))
    # Default minimum: a quarter of the model's input side (a thumbnail upscaled 4x is not a part image).
    min_side = cfg.model.min_frame_side or max(1, min(m.input.height, m.input.width) // 4)
    return LoadedModel(
        generation,
        bundle,
        backend,
        pre,
        tta,
        post,
        decider,
        per_call,
        info,
        min_frame_side=min_side,
        adaptive_band=cfg.tta.band if adaptive else None,
        boot_fallback=boot.reason if boot is not None else None,
        slots=slots,
    )
