"""Inference backends behind one small interface (:class:`Backend`): ONNX Runtime (CPU / CUDA) and
OpenVINO here, TensorRT in ``runtime.inference.tensorrt``. Which one serves a bundle is decided by
``runtime.inference.selection.create_backend``.

TensorRT, pycuda and openvino are imported only when their backend is created.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.bundle.load import Bundle, check_graph_io
from runtime.bundle.manifest import BundleError
from runtime.config.station import ModelConfig
from runtime.inference.ort_session import ort_session
from runtime.inference.preprocess import FLOAT_NCHW, input_dtype

if TYPE_CHECKING:  # openvino is imported only when its backend is created
    from runtime.inference.openvino import OpenVINOModel
    from runtime.inference.selection import Selection  # set on a backend once chosen

log = logging.getLogger("defectscope.backends")


class BackendError(RuntimeError):
    """A backend that cannot run this artifact here; the message says why."""


class Backend(ABC):
    """Runs a model artifact on its input batches ((N,C,H,W) float32, or (N,H,W,C) uint8 for a
    uint8-input artifact: ``input_kind``); returns the outputs in manifest order."""

    name: str = ""  # "onnxruntime-cpu" | "onnxruntime-cuda" | "openvino" | "tensorrt"
    artifact_key: str = ""
    precision: str = ""  # the artifact's (fp32, int8, fp16)
    inference_precision: str = "f32"  # what the float parts run in (OpenVINO may run bf16)
    selection: Selection | None = None  # set by create_backend
    min_batch: int = 1
    max_batch: int | None = None  # None: any batch size
    fixed_batch: bool = False  # the graph takes exactly max_batch (pad partial batches)
    input_kind: str = FLOAT_NCHW  # the artifact's manifest ``input`` (preprocess.INPUT_KINDS)

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
        """Run zeros (``shape``: one image of the artifact's input) so the first real frame does not pay
        for lazy init."""
        sizes = sorted({1, max(1, batch)})
        for _ in range(runs):
            for n in sizes:
                self.run(np.zeros((n, *shape), dtype=input_dtype(self.input_kind)))

    def stage(self, batch: np.ndarray) -> None:
        """Start moving ``batch`` to the device ahead of ``run(batch)`` (TensorRT: overlaps the running
        batch); a no-op for CPU engines."""
        return None

    def allocate_host(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """Host memory for input batches ([batching] zero_copy's arena); TensorRT gives page-locked memory."""
        return np.empty(shape, dtype=dtype)

    def close(self) -> None:
        """Release device resources (idempotent)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "artifact": self.artifact_key,
            "precision": self.precision,
            "inference_precision": self.inference_precision,
            "max_batch": self.max_batch,
            "input": self.input_kind,
        }

    @property
    def accuracy_id(self) -> str | None:
        """Key of this backend's entry in a bundle's per-backend accuracy record (None: not recorded)."""
        return None


# ---- ONNX Runtime ------------------------------------------------------------------------------
class OrtBackend(Backend):
    """ONNX Runtime session (CPU or CUDA provider)."""

    def __init__(self, bundle: Bundle, key: str, cuda: bool, threads: int, device_id: int = 0) -> None:
        import onnxruntime as ort

        art = bundle.artifact(key)
        if art.format != "onnx":
            raise BackendError(f"artifact {key!r} is {art.format}, ONNX Runtime needs an onnx artifact")
        path = bundle.path / art.file
        if cuda:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            # spin=False: spinning intra-op threads would steal the cores the capture threads decode on.
            sess = ort_session(path, threads, spin=False, providers=providers)
        except Exception as exc:  # ORT raises several exception types for bad models / providers
            raise BackendError(f"{path}: ONNX Runtime could not load the model: {exc}") from None
        if cuda and "CUDAExecutionProvider" not in sess.get_providers():
            raise BackendError("ONNX Runtime fell back to the CPU: the CUDA provider failed to initialise")
        try:
            check_graph_io(bundle.manifest, sess.get_inputs(), sess.get_outputs(), str(path), art.input)
        except BundleError as exc:
            raise BackendError(str(exc)) from None
        self.sess = sess
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"
        self.artifact_key = key
        self.precision, self.input_kind = art.precision, art.input
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

    @property
    def accuracy_id(self) -> str | None:
        return "onnxruntime"


# ---- OpenVINO ----------------------------------------------------------------------------------
class OpenVINOBackend(Backend):
    """OpenVINO on the CPU (runtime/inference/openvino.py): the bundle's ONNX, compiled and cached."""

    name = "openvino"

    def __init__(self, bundle: Bundle, key: str, cfg: ModelConfig) -> None:
        from runtime.inference.openvino import OpenVINOError, open_bundle_model

        try:
            m = open_bundle_model(bundle, key, cfg.openvino, cfg.threads)
        except OpenVINOError as exc:
            raise BackendError(str(exc)) from None
        self.model: OpenVINOModel | None = m  # None once closed
        self.artifact_key, self.precision = key, bundle.artifact(key).precision
        self.input_kind = bundle.artifact(key).input
        self.inference_precision = m.inference_precision
        if m.inference_precision != cfg.openvino.precision:
            log.warning(
                "openvino: asked for %s inference, the CPU plugin runs %s",
                cfg.openvino.precision,
                m.inference_precision,
            )
        if m.static_batch:
            self.max_batch, self.min_batch, self.fixed_batch = m.static_batch, m.static_batch, True
        if m.cache_refused:
            log.warning("openvino: compiled-model cache not used: %s", m.cache_refused)
        log.info(
            "openvino %s: %s compiled (%s, %s, %d thread(s), %d stream(s))%s",
            m.version,
            key,
            m.inference_precision,
            m.hint,
            m.threads,
            m.streams,
            " - loaded from the model cache" if m.loaded_from_cache else "",
        )

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        assert self.model is not None, "openvino backend used after close()"
        return self.model.run(batch)

    def close(self) -> None:
        model = getattr(self, "model", None)  # unset when __init__ failed
        if model is not None:
            model.close()
            self.model = None

    @property
    def accuracy_id(self) -> str | None:
        return f"openvino:{self.inference_precision}"

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.model is not None:
            out.update(
                openvino=self.model.version,
                hint=self.model.hint,
                streams=self.model.streams,
                loaded_from_cache=self.model.loaded_from_cache,
                cache_refused=self.model.cache_refused,
            )
        return out
