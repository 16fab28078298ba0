"""The TensorRT backend, the way NVIDIA's samples run an engine: pinned host buffers, device buffers
bound with ``set_tensor_address``, ``execute_async_v3`` on a CUDA stream, and the copy of the next
batch to the device overlapped with the current batch (a ring of buffer sets: the batch thread
``stage``s batch k+1 on a copy stream while the inference thread runs batch k).

Also: uint8 input bindings (a uint8-input artifact's engine: normalisation runs inside it), DLA
engines (``build-engine --dla-core``: the runtime deserializes them onto the recorded DLA core, or
``[model] dla_core``), and the refusal of an engine built for another TensorRT / GPU / JetPack
(``runtime.engine.meta``). tensorrt and pycuda are imported when the backend is created (extra
``tensorrt``); :func:`plan_buffers` and :func:`dla_core_for` are pure and tested on CPU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.bundle.load import Bundle
from runtime.bundle.manifest import Artifact
from runtime.inference.backends import Backend, BackendError
from runtime.inference.preprocess import input_shape

log = logging.getLogger("defectscope.backends")

# Buffer sets: one in the engine, one staged and handed over, one being staged by the batch thread
# (the pipeline's hand-over queue holds one batch), so the copy of the next batch never waits.
BUFFER_SETS = 3


def dla_core_for(artifact: Artifact, configured: int | None) -> int | None:
    """The DLA core to deserialize ``artifact`` onto: None for a GPU engine; else ``[model] dla_core`` if
    set, else the core it was built for. A DLA build that fell back to the GPU (``dla.core`` null) is a GPU engine."""
    dla = dict(artifact.extra or {}).get("dla")
    if not isinstance(dla, Mapping) or dla.get("core") is None:
        return None
    return int(configured) if configured is not None else int(dla["core"])


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dims: tuple[int, ...]  # at the largest batch
    dtype: np.dtype


def plan_buffers(io: Mapping[str, tuple[tuple[int, ...], np.dtype]], names: list[str], where: str) -> list[TensorPlan]:
    """Host/device buffer shapes for ``names`` (input first) from the context's shapes at the largest batch."""
    out = []
    for name in names:
        dims, dtype = io[name]
        if any(d < 0 for d in dims):
            raise BackendError(f"{where}: tensor {name!r} has a data-dependent shape {dims}; not supported")
        out.append(TensorPlan(name, tuple(int(d) for d in dims), np.dtype(dtype)))
    return out


class _BufferSet:
    """Pinned host + device memory for one batch in flight, and the event marking its input on the device."""

    def __init__(self, cuda: Any, plans: list[TensorPlan]) -> None:
        self.host = {p.name: cuda.pagelocked_empty(p.dims, p.dtype) for p in plans}
        self.device = {p.name: cuda.mem_alloc(max(self.host[p.name].nbytes, 1)) for p in plans}
        self.copied = cuda.Event()
        self.staged: np.ndarray | None = None  # the batch whose input copy was started (identity)
        self.busy = False
        self.seq = 0

    def free(self) -> None:
        for mem in self.device.values():
            try:
                mem.free()
            except Exception:  # freeing during interpreter teardown may fail; nothing to recover
                pass
        self.device, self.host = {}, {}


class TensorRTBackend(Backend):
    """A serialized TensorRT engine run with execute_async_v3 on a ring of preallocated buffer sets.

    The CUDA context is the device's primary context, pushed around every call so the engine
    can be used from threads that did not create it (the batch thread stages, the inference
    thread runs).
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, key: str, device_id: int = 0, dla_core: int | None = None) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as exc:
            raise BackendError(f"TensorRT backend needs tensorrt and pycuda: {exc}") from None
        art = bundle.artifact(key)
        if art.format != "tensorrt":
            raise BackendError(f"artifact {key!r} is {art.format}, not a TensorRT engine")
        path = bundle.path / art.file
        try:
            cuda.init()
            if cuda.Device.count() <= device_id:
                raise BackendError(f"no CUDA device {device_id} (found {cuda.Device.count()})")
            device = cuda.Device(device_id)
        except cuda.Error as exc:
            raise BackendError(f"CUDA is not usable here: {exc}") from None
        from runtime.engine.meta import EngineMismatchError, Platform, check_engine, read_l4t

        platform = Platform(
            tensorrt_version=str(trt.__version__),
            gpu=device.name(),
            compute_capability="{}.{}".format(*device.compute_capability()),
            l4t=read_l4t(),
        )
        try:
            check_engine(art, platform, str(bundle.path), key)  # before deserializing: engines are not portable
        except EngineMismatchError as exc:
            raise BackendError(str(exc)) from None
        self._trt, self._cuda = trt, cuda
        self._ctx = device.retain_primary_context()
        self._lock = threading.Lock()  # one engine call at a time
        self._stage_lock = threading.Lock()  # the buffer-set ring
        self._sets: list[_BufferSet] = []
        self._arenas: list[np.ndarray] = []  # pinned arenas handed out by allocate_host
        self._seq = 0
        self.dla_core = dla_core_for(art, dla_core)
        self._ctx.push()
        try:
            self._setup(bundle, key, art, path)
        except BaseException:
            self._release()
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
            raise
        self._ctx.pop()

    def _setup(self, bundle: Bundle, key: str, art: Artifact, path: os.PathLike[str]) -> None:
        trt, cuda = self._trt, self._cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        if self.dla_core is not None:
            available = int(getattr(trt.Builder(self._logger), "num_DLA_cores", 0) or 0)
            if self.dla_core >= available:
                raise BackendError(
                    f"{path}: engine built for the DLA, core {self.dla_core} asked for, this device has {available} "
                    "DLA core(s); set [model] dla_core to one of them or rebuild without --dla-core"
                )
            self._runtime.DLA_core = self.dla_core
        with open(path, "rb") as fh:
            engine = self._runtime.deserialize_cuda_engine(fh.read())
        if engine is None:
            raise BackendError(
                f"{path}: TensorRT could not deserialize the engine (built for another TensorRT "
                "version or GPU, or corrupt); rebuild it on this device"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{path}: could not create an execution context (out of GPU memory?)")
        from runtime.engine.meta import check_engine_io

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        io = {n: tuple(engine.get_tensor_shape(n)) for n in names}
        inputs = [(n, io[n]) for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [(n, io[n]) for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        manifest = bundle.manifest
        spec = manifest.input
        per_image = input_shape(spec, art.input)
        classes = len(manifest.classes) if manifest.model.task == "classification" else None
        try:
            check_engine_io(inputs, outputs, spec.name, per_image, manifest.output.names, classes, str(path))
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        self.input_name = spec.name
        self.input_kind = art.input
        self.output_names = list(manifest.output.names)
        shape = io[self.input_name]
        if shape[0] == -1:
            lo, _opt, hi = engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])  # profile 0 is the context's default
        else:
            self.min_batch = self.max_batch = int(shape[0])
            self.fixed_batch = True
        self.artifact_key, self.precision = key, art.precision
        # INT8 engines: the float layers' precision was fixed at build time (FP16 when enabled).
        self.inference_precision = "f16" if art.precision in ("fp16", "int8") else "f32"
        self._stream = cuda.Stream()  # engine + output copies
        self._copy_stream = cuda.Stream()  # input copies of staged batches, overlapping the engine
        assert self.max_batch is not None
        if not self.context.set_input_shape(self.input_name, (self.max_batch, *per_image)):
            raise BackendError(f"{path}: TensorRT refused input shape {(self.max_batch, *per_image)}")
        shapes = {
            n: (tuple(self.context.get_tensor_shape(n)), np.dtype(trt.nptype(engine.get_tensor_dtype(n))))
            for n in [self.input_name, *self.output_names]
        }
        plans = plan_buffers(shapes, [self.input_name, *self.output_names], str(path))
        self._input_dtype = plans[0].dtype
        self._sets = [_BufferSet(cuda, plans) for _ in range(BUFFER_SETS)]
        self._bound_batch = self.max_batch

    # ---- host memory + staging (batch thread) ------------------------------------------------------
    def allocate_host(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """Page-locked (portable) host memory: [batching] zero_copy's arena; its batches go to the device by DMA."""
        self._ctx.push()
        try:
            arena = self._cuda.pagelocked_empty(shape, dtype, mem_flags=self._cuda.host_alloc_flags.PORTABLE)
        finally:
            self._ctx.pop()
        self._arenas.append(arena)
        return arena

    def _fits(self, n: int) -> bool:
        cap = self.max_batch or n
        return self.min_batch <= n <= cap and not (self.fixed_batch and n != cap)

    def stage(self, batch: np.ndarray) -> None:
        """Start copying ``batch`` to the device on the copy stream (the batch thread, one batch ahead);
        ``run`` of the same array then only waits for that copy. Skipped when no buffer set is free."""
        if not self._fits(batch.shape[0]):
            return
        # Held while the copy is queued, so close() cannot free the buffers under it.
        with self._stage_lock:
            if self._ctx is None:
                return
            buf = next((b for b in self._sets if not b.busy), None)
            if buf is None:
                return
            self._seq += 1
            buf.busy, buf.staged, buf.seq = True, batch, self._seq
            self._ctx.push()
            try:
                self._copy_in(buf, batch, self._copy_stream)
            except BaseException:
                buf.busy, buf.staged = False, None
                raise
            finally:
                self._ctx.pop()

    def _pinned(self, batch: np.ndarray) -> bool:
        return (
            batch.dtype == self._input_dtype
            and batch.flags.c_contiguous
            and any(np.may_share_memory(batch, a) for a in self._arenas)
        )

    def _copy_in(self, buf: _BufferSet, batch: np.ndarray, stream: Any) -> None:
        n = batch.shape[0]
        if self._pinned(batch):
            src = batch  # already page-locked (the zero-copy arena): DMA straight from it
        else:
            src = buf.host[self.input_name][:n]
            np.copyto(src, batch, casting="same_kind")  # float32 -> engine dtype (fp16 inputs); uint8 as is
        self._cuda.memcpy_htod_async(buf.device[self.input_name], src, stream)
        buf.copied.record(stream)

    def _take(self, batch: np.ndarray) -> tuple[_BufferSet, bool]:
        """(the set holding ``batch``'s staged copy, True) or (a set to copy it into now, False)."""
        with self._stage_lock:
            staged = next((b for b in self._sets if b.staged is batch), None)
            if staged is not None:
                return staged, True
            free = next((b for b in self._sets if not b.busy), None)
            if free is None:  # every set staged for batches that were never run (an error upstream): reuse the oldest
                free = min(self._sets, key=lambda b: b.seq)
                log.warning("tensorrt: dropping a staged copy that was never run")
            self._seq += 1
            free.busy, free.staged, free.seq = True, None, self._seq
            return free, False

    # ---- the engine call (inference thread) --------------------------------------------------------
    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        cuda = self._cuda
        n = batch.shape[0]
        with self._lock:
            self._ctx.push()
            buf, staged = self._take(batch)
            try:
                if staged:
                    self._stream.wait_for_event(buf.copied)  # the copy ran while the previous batch computed
                else:
                    self._copy_in(buf, batch, self._stream)
                if n != self._bound_batch:
                    if not self.context.set_input_shape(self.input_name, tuple(batch.shape)):
                        raise BackendError(f"TensorRT refused input shape {tuple(batch.shape)}")
                    self._bound_batch = n
                for name, mem in buf.device.items():
                    self.context.set_tensor_address(name, int(mem))
                if not self.context.execute_async_v3(self._stream.handle):
                    raise BackendError("TensorRT execute_async_v3 failed")
                outs = []
                for name in self.output_names:
                    host_out = buf.host[name][:n]  # batch-major: the first n rows are this batch's
                    cuda.memcpy_dtoh_async(host_out, buf.device[name], self._stream)
                    outs.append(host_out)
                self._stream.synchronize()
                # Copy out: the pinned buffers are reused by the next call.
                return [o.astype(np.float32) if o.dtype == np.float16 else o.copy() for o in outs]
            finally:
                with self._stage_lock:
                    buf.busy, buf.staged = False, None
                self._ctx.pop()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["dla_core"] = self.dla_core
        return out

    def _release(self) -> None:
        for buf in getattr(self, "_sets", []):
            buf.free()
        self._sets = []
        self.context = None  # the execution context goes before its engine
        self.engine = None

    def close(self) -> None:
        if getattr(self, "_ctx", None) is None:
            return
        with self._lock, self._stage_lock:
            self._ctx.push()
            try:
                self._release()
            finally:
                self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
