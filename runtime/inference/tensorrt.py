"""The TensorRT backend: a serialized engine of the bundle, run on preallocated pinned buffers.

tensorrt and pycuda are imported when the backend is created (extra ``tensorrt``).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from runtime.bundle.manifest import Artifact, Bundle
from runtime.inference.backends import Backend, BackendError


class TensorRTBackend(Backend):
    """A serialized TensorRT engine run with execute_async_v3 on preallocated pinned buffers.

    The CUDA context is the device's primary context, pushed around every call
    so the engine can be used from the inference thread that did not create it.
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, key: str, device_id: int = 0) -> None:
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
        from runtime.engine.meta import EngineMismatchError, Platform, check_engine

        platform = Platform(
            tensorrt_version=str(trt.__version__),
            gpu=device.name(),
            compute_capability="{}.{}".format(*device.compute_capability()),
        )
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
        # INT8 engines: the float layers' precision was fixed at build time (FP16 when enabled).
        self.inference_precision = "f16" if art.precision in ("fp16", "int8") else "f32"
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
