"""Backends: selection (auto / named), ONNX Runtime on real sessions, static-batch padding,
and TensorRT (real engine built from the tiny ONNX; skipped without TensorRT + a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import FACTORIES, BackendError, candidates, create_backend, register
from runtime.bundle import Artifact, Manifest, load_bundle, write_bundle
from runtime.config import ModelConfig

from ._helpers import SIZE, make_bundle, manifest_dict, tiny_onnx


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, SIZE, SIZE)).astype(np.float32)


def _reference(x: np.ndarray, gain: float = 3.0) -> np.ndarray:
    m = x.mean(axis=(2, 3)).sum(axis=1) / 3.0
    return np.stack([-gain * m, gain * m], axis=1)


def _with_fake_engine(tmp_path: Path) -> Path:
    """A bundle with an ONNX artifact and a (not loadable here) TensorRT engine artifact."""
    src = tiny_onnx(tmp_path / "src" / "model.onnx")
    engine = tmp_path / "src" / "model.engine"
    engine.write_bytes(b"\x00not-an-engine")
    data = manifest_dict()
    data["artifacts"]["trt-fp16"] = {"file": "engines/model.fp16.engine", "format": "tensorrt", "precision": "fp16",
                                     "tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7",
                                     "batch": [1, 8]}
    dest = tmp_path / "bundle"
    write_bundle(dest, Manifest.from_dict(data), {"model.onnx": src, "engines/model.fp16.engine": engine})
    return dest


def test_ort_cpu_runs_the_model(tmp_path: Path) -> None:
    b = load_bundle(make_bundle(tmp_path / "b"))
    backend = create_backend(b, ModelConfig(bundle=b.path, backend="onnxruntime-cpu"))
    x = _batch(5)
    (logits,) = backend.run(x)
    np.testing.assert_allclose(logits, _reference(x), rtol=1e-4, atol=1e-5)
    assert backend.describe() == {"backend": "onnxruntime-cpu", "artifact": "fp32", "precision": "fp32",
                                  "max_batch": None}


def test_static_batch_model_is_padded_and_split(tmp_path: Path) -> None:
    b = load_bundle(make_bundle(tmp_path / "b", static_batch=4))
    backend = create_backend(b, ModelConfig(bundle=b.path, backend="onnxruntime-cpu"))
    assert (backend.max_batch, backend.fixed_batch) == (4, True)
    for n in (1, 4, 7, 9):
        x = _batch(n, seed=n)
        (logits,) = backend.run(x)
        assert logits.shape == (n, 2)
        np.testing.assert_allclose(logits, _reference(x), rtol=1e-4, atol=1e-5)


def test_auto_falls_back_from_an_unusable_engine_to_onnxruntime(tmp_path: Path) -> None:
    b = load_bundle(_with_fake_engine(tmp_path))
    cfg = ModelConfig(bundle=b.path, backend="auto")
    assert candidates(b, cfg) == [("tensorrt", "trt-fp16"), ("onnxruntime-cuda", "fp32"), ("onnxruntime-cpu", "fp32")]
    backend = create_backend(b, cfg)
    import onnxruntime as ort

    expected = "onnxruntime-cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "onnxruntime-cpu"
    if importlib.util.find_spec("tensorrt") is None or expected == "onnxruntime-cpu":
        assert backend.name == expected
    assert backend.artifact_key == "fp32"


def test_named_backends_are_used_or_refused_never_replaced(tmp_path: Path) -> None:
    plain = load_bundle(make_bundle(tmp_path / "plain"))
    with pytest.raises(BackendError, match="build-engine"):
        create_backend(plain, ModelConfig(bundle=plain.path, backend="tensorrt"))
    with pytest.raises(BackendError, match="'nope' is not in the bundle"):
        create_backend(plain, ModelConfig(bundle=plain.path, artifact="nope"))
    fake = load_bundle(_with_fake_engine(tmp_path))
    with pytest.raises(BackendError, match="needs an onnx artifact"):
        create_backend(fake, ModelConfig(bundle=fake.path, backend="onnxruntime-cpu", artifact="trt-fp16"))
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendError, match="tensorrt and pycuda"):
            create_backend(fake, ModelConfig(bundle=fake.path, backend="tensorrt"))
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendError, match="CUDAExecutionProvider"):
            create_backend(plain, ModelConfig(bundle=plain.path, backend="onnxruntime-cuda"))


def test_backend_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("onnxruntime-cpu")(lambda *a: None)
    assert set(FACTORIES) == {"onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"}


def _cuda_device() -> object | None:
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None:
        return None
    import pycuda.driver as cuda

    try:
        cuda.init()
        return cuda.Device(0) if cuda.Device.count() else None
    except cuda.Error:
        return None


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tmp_path: Path) -> None:
    device = _cuda_device()
    if device is None:
        pytest.skip("needs tensorrt + pycuda and a CUDA GPU")
    import tensorrt as trt

    onnx_path = tiny_onnx(tmp_path / "src" / "model.onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None
    engine_path = tmp_path / "src" / "model.engine"
    engine_path.write_bytes(bytes(engine))
    cc = "{}.{}".format(*device.compute_capability())
    data = manifest_dict()
    data["artifacts"]["trt-fp32"] = Artifact(file="engines/model.engine", format="tensorrt", precision="fp32",
                                             tensorrt_version=trt.__version__, gpu=device.name(),
                                             compute_capability=cc, batch=(1, 8)).to_dict()
    b = write_bundle(tmp_path / "bundle", Manifest.from_dict(data),
                     {"model.onnx": onnx_path, "engines/model.engine": engine_path})
    backend = create_backend(b, ModelConfig(bundle=b.path, backend="auto"))
    try:
        assert (backend.name, backend.min_batch, backend.max_batch) == ("tensorrt", 1, 8)
        for n in (1, 3, 8, 11):  # 11 > profile max: split into two calls
            x = _batch(n, seed=n)
            (logits,) = backend.run(x)
            np.testing.assert_allclose(logits, _reference(x), rtol=1e-3, atol=1e-3)
    finally:
        backend.close()
    # An engine claiming another GPU is refused before deserialisation.
    data["artifacts"]["trt-fp32"]["compute_capability"] = "1.0"
    other = write_bundle(tmp_path / "other", Manifest.from_dict(data),
                         {"model.onnx": onnx_path, "engines/model.engine": engine_path})
    with pytest.raises(BackendError, match="compute capability 1.0"):
        create_backend(other, ModelConfig(bundle=other.path, backend="tensorrt"))
