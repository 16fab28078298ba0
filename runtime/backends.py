"""Inference backends behind one small interface: ONNX Runtime (CPU / CUDA) and TensorRT.

``create_backend(bundle, model_cfg)`` picks the artifact and backend: ``auto``
tries a TensorRT engine of the bundle (when tensorrt + pycuda import, a GPU is
present and the engine was built for this TensorRT version and GPU), then ONNX
Runtime with the CUDA provider, then ONNX Runtime on the CPU. A named backend
is used or refused, never silently replaced.

TensorRT and pycuda are imported only when a TensorRT backend is created.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np

from runtime.bundle import Artifact, Bundle, BundleError, check_graph_io
from runtime.config import ModelConfig

log = logging.getLogger("defectscope.backends")


class BackendError(RuntimeError):
    """A backend that cannot run this artifact here; the message says why."""


class Backend(ABC):
    """Runs a model artifact on (N,C,H,W) float32 batches; returns the outputs in manifest order."""

    name: str = ""  # "onnxruntime-cpu" | "onnxruntime-cuda" | "tensorrt"
    artifact_key: str = ""
    precision: str = ""
    min_batch: int = 1
    max_batch: int | None = None  # None: any batch size
    fixed_batch: bool = False  # the graph takes exactly max_batch (pad partial batches)

    @abstractmethod
    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        """One call on a batch the model accepts as is."""

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs for ``batch`` (N,C,H,W); split / padded to what the model accepts."""
        n = batch.shape[0]
        if n == 0:
            raise ValueError("empty batch")
        cap = self.max_batch or n
        if n <= cap and n >= self.min_batch and not (self.fixed_batch and n != cap):
            return self._run(batch)
        pieces: list[list[np.ndarray]] = []
        for start in range(0, n, cap):
            chunk = batch[start : start + cap]
            m = chunk.shape[0]
            want = cap if self.fixed_batch else max(m, self.min_batch)
            if want != m:
                pad = np.zeros((want - m, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            pieces.append([o[:m] for o in self._run(chunk)])
        return [np.concatenate([p[i] for p in pieces]) for i in range(len(pieces[0]))]

    def warmup(self, shape: tuple[int, ...], runs: int, batch: int) -> None:
        """Run zeros through the model so the first real frame does not pay for lazy init."""
        sizes = sorted({1, max(1, batch)})
        for _ in range(runs):
            for n in sizes:
                self.run(np.zeros((n, *shape), dtype=np.float32))

    def close(self) -> None:
        """Release device resources (idempotent)."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "artifact": self.artifact_key, "precision": self.precision,
                "max_batch": self.max_batch}


# ---- ONNX Runtime ------------------------------------------------------------------------------
class OrtBackend(Backend):
    """ONNX Runtime session (CPU or CUDA provider)."""

    def __init__(self, bundle: Bundle, key: str, cuda: bool, threads: int, device_id: int = 0) -> None:
        import onnxruntime as ort

        art = bundle.artifact(key)
        if art.format != "onnx":
            raise BackendError(f"artifact {key!r} is {art.format}, ONNX Runtime needs an onnx artifact")
        path = bundle.path / art.file
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads would steal the cores the capture threads decode on.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        if cuda:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            sess = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # ORT raises several exception types for bad models / providers
            raise BackendError(f"{path}: ONNX Runtime could not load the model: {exc}") from None
        if cuda and "CUDAExecutionProvider" not in sess.get_providers():
            raise BackendError("ONNX Runtime fell back to the CPU: the CUDA provider failed to initialise")
        try:
            check_graph_io(bundle.manifest, sess.get_inputs(), sess.get_outputs(), str(path))
        except BundleError as exc:
            raise BackendError(str(exc)) from None
        self.sess = sess
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"
        self.artifact_key = key
        self.precision = art.precision
        self.input_name = sess.get_inputs()[0].name
        self.output_names = list(bundle.manifest.output.names)
        dim = sess.get_inputs()[0].shape[0]
        if isinstance(dim, int) and dim > 0:
            # Exported with a static batch: feed exactly that many (padding partial batches).
            self.max_batch, self.min_batch, self.fixed_batch = dim, dim, True

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.sess.run(self.output_names, {self.input_name: batch})

    def close(self) -> None:
        self.sess = None


# ---- TensorRT ----------------------------------------------------------------------------------
class TensorRTBackend(Backend):
    """A serialized TensorRT engine run with execute_async_v3 on preallocated pinned buffers.

    The CUDA context is the device's primary context, pushed around every call
    so the engine can be used from the inference thread that did not create it.
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, key: str, device_id: int = 0) -> None:
        try:
            import tensorrt as trt
            import pycuda.driver as cuda
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
        from runtime.engine_meta import EngineMismatchError, Platform, check_engine

        platform = Platform(tensorrt_version=str(trt.__version__), gpu=device.name(),
                            compute_capability="{}.{}".format(*device.compute_capability()))
        try:
            check_engine(art, platform, str(bundle.path), key)  # before deserializing: engines are not portable
        except EngineMismatchError as exc:
            raise BackendError(str(exc)) from None
        self._trt, self._cuda = trt, cuda
        self._ctx = device.retain_primary_context()
        self._lock = threading.Lock()
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
        with open(path, "rb") as fh:
            engine = self._runtime.deserialize_cuda_engine(fh.read())
        if engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize the engine (built for another TensorRT "
                               "version or GPU, or corrupt); rebuild it on this device")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{path}: could not create an execution context (out of GPU memory?)")
        from runtime.engine_meta import check_engine_io

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        io = {n: tuple(engine.get_tensor_shape(n)) for n in names}
        inputs = [(n, io[n]) for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [(n, io[n]) for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        manifest = bundle.manifest
        spec = manifest.input
        classes = len(manifest.classes) if manifest.model.task == "classification" else None
        try:
            check_engine_io(inputs, outputs, spec.name, spec.shape, manifest.output.names, classes, str(path))
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        self.input_name = spec.name
        self.output_names = list(manifest.output.names)
        shape = io[self.input_name]
        if shape[0] == -1:
            lo, _opt, hi = engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])  # profile 0 is the context's default
        else:
            self.min_batch = self.max_batch = int(shape[0])
            self.fixed_batch = True
        self.artifact_key, self.precision = key, art.precision
        self._stream = cuda.Stream()
        # Preallocate for the largest batch: pinned host buffers + device buffers, bound once.
        if not self.context.set_input_shape(self.input_name, (self.max_batch, *spec.shape)):
            raise BackendError(f"{path}: TensorRT refused input shape {(self.max_batch, *spec.shape)}")
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        for name in [self.input_name, *self.output_names]:
            dims = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in dims):
                raise BackendError(f"{path}: output {name!r} has a data-dependent shape {dims}; not supported")
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            host = cuda.pagelocked_empty(dims, dtype)
            self._host[name] = host
            self._device[name] = cuda.mem_alloc(max(host.nbytes, 1))
            self.context.set_tensor_address(name, int(self._device[name]))
        self._bound_batch = self.max_batch

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        cuda = self._cuda
        n = batch.shape[0]
        with self._lock:
            self._ctx.push()
            try:
                if n != self._bound_batch:
                    if not self.context.set_input_shape(self.input_name, tuple(batch.shape)):
                        raise BackendError(f"TensorRT refused input shape {tuple(batch.shape)}")
                    self._bound_batch = n
                host_in = self._host[self.input_name][:n]
                np.copyto(host_in, batch, casting="same_kind")  # float32 -> engine dtype (fp16 inputs)
                cuda.memcpy_htod_async(self._device[self.input_name], host_in, self._stream)
                if not self.context.execute_async_v3(self._stream.handle):
                    raise BackendError("TensorRT execute_async_v3 failed")
                outs = []
                for name in self.output_names:
                    host_out = self._host[name][:n]  # batch-major: the first n rows are this batch's
                    cuda.memcpy_dtoh_async(host_out, self._device[name], self._stream)
                    outs.append(host_out)
                self._stream.synchronize()
                # Copy out: the pinned buffers are reused by the next call.
                return [o.astype(np.float32) if o.dtype == np.float16 else o.copy() for o in outs]
            finally:
                self._ctx.pop()

    def _release(self) -> None:
        for mem in getattr(self, "_device", {}).values():
            try:
                mem.free()
            except Exception:  # freeing during interpreter teardown may fail; nothing to recover
                pass
        self._device = {}
        self._host = {}  # pinned host memory is freed while the context is current
        self.context = None  # the execution context goes before its engine
        self.engine = None

    def close(self) -> None:
        if getattr(self, "_ctx", None) is None:
            return
        with self._lock:
            self._ctx.push()
            try:
                self._release()
            finally:
                self._ctx.pop()
            self._ctx.detach()
            self._ctx = None


# ---- selection ---------------------------------------------------------------------------------
FACTORIES: dict[str, Callable[[Bundle, str, ModelConfig], Backend]] = {}


def register(name: str) -> Callable[[Callable[[Bundle, str, ModelConfig], Backend]], Callable[[Bundle, str, ModelConfig], Backend]]:
    """Register a backend factory under a config name; refuses duplicates."""

    def deco(fn: Callable[[Bundle, str, ModelConfig], Backend]) -> Callable[[Bundle, str, ModelConfig], Backend]:
        if name in FACTORIES:
            raise ValueError(f"backend {name!r} registered twice")
        FACTORIES[name] = fn
        return fn

    return deco


@register("onnxruntime-cpu")
def _ort_cpu(bundle: Bundle, key: str, cfg: ModelConfig) -> Backend:
    return OrtBackend(bundle, key, cuda=False, threads=cfg.threads)


@register("onnxruntime-cuda")
def _ort_cuda(bundle: Bundle, key: str, cfg: ModelConfig) -> Backend:
    return OrtBackend(bundle, key, cuda=True, threads=cfg.threads, device_id=cfg.device_id)


@register("tensorrt")
def _tensorrt(bundle: Bundle, key: str, cfg: ModelConfig) -> Backend:
    return TensorRTBackend(bundle, key, device_id=cfg.device_id)


def _default_onnx(bundle: Bundle) -> str | None:
    arts = bundle.manifest.artifacts
    default = bundle.manifest.default_artifact
    if arts[default].format == "onnx":
        return default
    for key in ("int8", "fp32", "fp16"):
        if key in arts and arts[key].format == "onnx":
            return key
    return next((k for k, a in arts.items() if a.format == "onnx"), None)


def candidates(bundle: Bundle, cfg: ModelConfig) -> list[tuple[str, str]]:
    """(backend, artifact key) pairs to try, in order; BackendError if none can apply."""
    arts = bundle.manifest.artifacts
    if cfg.artifact is not None and cfg.artifact not in arts:
        raise BackendError(f"[model] artifact {cfg.artifact!r} is not in the bundle; it has {sorted(arts)}")
    trt_keys = [cfg.artifact] if cfg.artifact else [k for k, a in arts.items() if a.format == "tensorrt"]
    trt_keys = [k for k in trt_keys if arts[k].format == "tensorrt"]
    if trt_keys and arts[bundle.manifest.default_artifact].format == "tensorrt":
        trt_keys.sort(key=lambda k: k != bundle.manifest.default_artifact)
    onnx_key = cfg.artifact if cfg.artifact and arts[cfg.artifact].format == "onnx" else (
        None if cfg.artifact else _default_onnx(bundle))
    if cfg.backend == "auto":
        out = [("tensorrt", k) for k in trt_keys]
        if onnx_key:
            out += [("onnxruntime-cuda", onnx_key), ("onnxruntime-cpu", onnx_key)]
        if not out:
            raise BackendError("the bundle has no artifact any backend can run")
        return out
    if cfg.backend == "tensorrt":
        if not trt_keys:
            raise BackendError(f"[model] backend 'tensorrt' needs a tensorrt artifact; the bundle has "
                               f"{ {k: a.format for k, a in arts.items()} } (defectscope build-engine makes one)")
        return [("tensorrt", trt_keys[0])]
    if not onnx_key:
        raise BackendError(f"[model] backend {cfg.backend!r} needs an onnx artifact; "
                           f"{cfg.artifact!r} is {arts[cfg.artifact].format}")
    return [(cfg.backend, onnx_key)]


def create_backend(bundle: Bundle, cfg: ModelConfig) -> Backend:
    """The first usable backend for the bundle per ``cfg.backend`` (see module doc)."""
    reasons = []
    for name, key in candidates(bundle, cfg):
        if name == "onnxruntime-cuda" and cfg.backend == "auto":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                reasons.append(f"{name}: no CUDA provider in this onnxruntime build")
                continue
        try:
            backend = FACTORIES[name](bundle, key, cfg)
        except BackendError as exc:
            if cfg.backend != "auto":
                raise
            reasons.append(f"{name} ({key}): {exc}")
            log.info("backend %s for artifact %s not usable: %s", name, key, exc)
            continue
        if reasons:
            log.info("backend auto: using %s (%s) after: %s", name, key, "; ".join(reasons))
        return backend
    raise BackendError("no usable backend: " + "; ".join(reasons))
