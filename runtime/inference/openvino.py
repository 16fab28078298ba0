"""The OpenVINO backend: a bundle's ONNX artifact (FP32 or INT8 QDQ) compiled for the CPU.

Settings come from ``[model]`` (``threads``) and ``[model.openvino]`` (cache_dir, hint,
precision, infer_requests; see runtime/config/station.py). The compiled model is cached under
``cache_dir``, keyed by OpenVINO on the graph content and the compile options, so a restart
or a reload of the same model loads the blob instead of recompiling; a changed model or
setting compiles again. The model is read from the bundle (whose checksums were verified)
and compiled from that in-memory graph, not from its path: a path-keyed cache would serve a
stale blob when a bundle is rewritten in place.

``openvino`` is imported only when this backend is created (extra ``openvino``).
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np

from runtime.bundle.load import check_graph_io
from runtime.bundle.manifest import BundleError

DEVICE = "CPU"


class OpenVINOError(RuntimeError):
    """OpenVINO missing or unable to compile/run the model; the message says why."""


def ov_properties(
    threads: int, hint: str, precision: str, infer_requests: int, cache_dir: str | os.PathLike[str] | None
) -> dict[str, Any]:
    """The compile options (OpenVINO property names) for these settings."""
    props: dict[str, Any] = {
        "PERFORMANCE_HINT": hint.upper(),
        "INFERENCE_NUM_THREADS": int(threads),
        "INFERENCE_PRECISION_HINT": precision,
    }
    if infer_requests > 1:
        # One CPU stream per request, so the requests of one batch really run side by side
        # (threads are divided among the streams).
        props["NUM_STREAMS"] = int(infer_requests)
    if cache_dir is not None:
        props["CACHE_DIR"] = str(cache_dir)
    return props


def unsafe_cache_dir(path: str | os.PathLike[str]) -> str | None:
    """Why the compiled-model cache at ``path`` must not be used, or None (created 0700 when missing).

    A cached blob is loaded and run as compiled code: a directory another user can write
    (group/other-writable, or owned by someone else) could hold a planted one.
    """
    import stat

    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        return f"cannot create {os.fspath(path)!r}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{os.fspath(path)!r} is not a directory"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{os.fspath(path)!r} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"{os.fspath(path)!r} is owned by uid {st.st_uid}, not this process (uid {os.geteuid()})"
    return None


def type_name(value: Any) -> str:
    """'f32' / 'bf16' for an ov.Type property value."""
    to_string = getattr(value, "to_string", None)
    return to_string() if callable(to_string) else str(value)


class OpenVINOModel:
    """A compiled ONNX model and its infer requests; ``run`` maps the input batch (N,C,H,W) float32, or
    (N,H,W,C) uint8 for a uint8-input artifact, to outputs by name."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        output_names: list[str],
        *,
        threads: int = 1,
        hint: str = "latency",
        precision: str = "f32",
        infer_requests: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
        input_name: str | None = None,
    ) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise OpenVINOError(
                f"the OpenVINO backend needs openvino (pip install 'defectscope[openvino]'): {exc}"
            ) from None
        self.cache_refused = unsafe_cache_dir(cache_dir) if cache_dir is not None else None
        if self.cache_refused:
            cache_dir = None  # compile every time rather than load blobs others could have planted
        props = ov_properties(threads, hint, precision, infer_requests, cache_dir)
        try:
            core = ov.Core()
            model = core.read_model(str(path))
            compiled = core.compile_model(model, DEVICE, props)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses for bad graphs / options
            raise OpenVINOError(f"{path}: OpenVINO could not compile the model: {exc}") from None
        self.path = str(path)
        self.compiled = compiled
        self.version = ov.__version__
        self.loaded_from_cache = bool(self._prop("LOADED_FROM_CACHE", False))
        self.inference_precision = type_name(self._prop("INFERENCE_PRECISION_HINT", precision))
        self.hint = str(self._prop("PERFORMANCE_HINT", hint.upper())).lower()
        self.streams = int(self._prop("NUM_STREAMS", 1))
        self.threads = int(self._prop("INFERENCE_NUM_THREADS", threads))
        # A tensor may carry several names; report the expected one when it is among them.
        self.inputs = [
            SimpleNamespace(
                name=input_name if input_name in p.get_names() else p.any_name,
                shape=_dims(p.partial_shape),
                type=p.get_element_type().get_type_name(),  # "f32" / "u8"
            )
            for p in compiled.inputs
        ]
        ports = {}
        for name in output_names:
            port = next((p for p in compiled.outputs if name in p.get_names()), None)
            if port is None:
                raise OpenVINOError(
                    f"{path}: no output named {name!r}; the model has "
                    f"{[sorted(p.get_names()) for p in compiled.outputs]}"
                )
            ports[name] = port
        self.outputs = [SimpleNamespace(name=n, shape=_dims(p.partial_shape)) for n, p in ports.items()]
        self._ports = list(ports.values())
        self.static_batch = self.inputs[0].shape[0] if self.inputs else None  # set: no splitting over requests
        self._dtype = np.uint8 if self.inputs and self.inputs[0].type == "u8" else np.float32
        self._requests = [compiled.create_infer_request() for _ in range(max(1, infer_requests))]
        self._lock = threading.Lock()

    def _prop(self, name: str, default: Any) -> Any:
        try:
            return self.compiled.get_property(name)
        except Exception:  # a property this OpenVINO version does not report
            return default

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs in ``output_names`` order; with several requests the batch is split over them."""
        x = np.ascontiguousarray(batch, dtype=self._dtype)
        with self._lock:
            reqs = self._requests
            if len(reqs) == 1 or x.shape[0] == 1 or self.static_batch:
                res = reqs[0].infer({0: x}, share_inputs=True, share_outputs=False)  # outputs copied out
                return [res[p] for p in self._ports]
            chunks = [c for c in np.array_split(x, min(len(reqs), x.shape[0])) if c.shape[0]]
            for req, chunk in zip(reqs, chunks):
                req.start_async({0: chunk}, share_inputs=True)
            outs: list[list[np.ndarray]] = []
            for req in reqs[: len(chunks)]:
                req.wait()
                # The request owns its output memory and reuses it on the next call: copy out.
                outs.append([np.array(req.get_tensor(p).data, copy=True) for p in self._ports])
        return [np.concatenate([o[i] for o in outs]) for i in range(len(self._ports))]

    def close(self) -> None:
        self._requests = []
        self.compiled = None


def _dims(shape: Any) -> list[int | None]:
    return [d.get_length() if d.is_static else None for d in shape]


def open_bundle_model(bundle: Any, key: str, settings: Any, threads: int) -> OpenVINOModel:
    """Compile artifact ``key`` of a loaded bundle; ``settings`` is a config.OpenVINOConfig."""
    art = bundle.artifact(key)
    if art.format != "onnx":
        raise OpenVINOError(f"artifact {key!r} is {art.format}, OpenVINO runs onnx artifacts")
    path = bundle.path / art.file
    model = OpenVINOModel(
        path,
        list(bundle.manifest.output.names),
        threads=threads,
        hint=settings.hint,
        precision=settings.precision,
        infer_requests=settings.infer_requests,
        cache_dir=settings.cache_dir,
        input_name=bundle.manifest.input.name,
    )
    try:
        check_graph_io(bundle.manifest, model.inputs, model.outputs, str(path), art.input)
    except BundleError as exc:
        model.close()
        raise OpenVINOError(str(exc)) from None
    return model
