"""Backends: selection (auto / named, order, refusal by the accuracy record, fallback when a
backend's creation fails), ONNX Runtime and OpenVINO on real sessions (OpenVINO skipped when
not installed), the compiled-model cache, static-batch padding, the [model.openvino] keys, and
TensorRT (real engine built from the tiny ONNX; skipped without TensorRT + a GPU)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle.load import load_bundle
from runtime.bundle.manifest import Artifact, Manifest
from runtime.bundle.write import write_bundle
from runtime.config.station import ModelConfig, OpenVINOConfig
from runtime.inference.backends import BackendError
from runtime.inference.selection import FACTORIES, candidates, create_backend, register

from ._helpers import SIZE, make_bundle, manifest_dict, tiny_onnx

HAVE_OV = importlib.util.find_spec("openvino") is not None
X86 = __import__("platform").machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
needs_ov = pytest.mark.skipif(not HAVE_OV, reason="openvino is not installed (extra 'openvino'; make test installs it)")


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
    data["artifacts"]["trt-fp16"] = {
        "file": "engines/model.fp16.engine",
        "format": "tensorrt",
        "precision": "fp16",
        "tensorrt_version": "10.3.0",
        "gpu": "Orin",
        "compute_capability": "8.7",
        "batch": [1, 8],
    }
    dest = tmp_path / "bundle"
    write_bundle(dest, Manifest.from_dict(data), {"model.onnx": src, "engines/model.fp16.engine": engine})
    return dest


def test_ort_cpu_runs_the_model(tmp_path: Path) -> None:
    b = load_bundle(make_bundle(tmp_path / "b"))
    backend = create_backend(b, ModelConfig(bundle=b.path, backend="onnxruntime-cpu"))
    x = _batch(5)
    (logits,) = backend.run(x)
    np.testing.assert_allclose(logits, _reference(x), rtol=1e-4, atol=1e-5)
    assert backend.describe() == {
        "backend": "onnxruntime-cpu",
        "artifact": "fp32",
        "precision": "fp32",
        "inference_precision": "f32",
        "max_batch": None,
        "input": "float32_nchw",
    }
    assert backend.selection.reason == "named in [model] backend" and backend.selection.skipped == ()


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
    assert candidates(b, cfg) == [
        ("tensorrt", "trt-fp16"),
        ("onnxruntime-cuda", "fp32"),
        ("openvino", "fp32"),
        ("onnxruntime-cpu", "fp32"),
    ]
    backend = create_backend(b, cfg)
    import onnxruntime as ort

    expected = (
        "onnxruntime-cuda"
        if "CUDAExecutionProvider" in ort.get_available_providers()
        else ("openvino" if HAVE_OV and X86 else "onnxruntime-cpu")
    )
    if importlib.util.find_spec("tensorrt") is None or expected != "onnxruntime-cuda":
        assert backend.name == expected
        assert backend.selection.skipped[0].startswith("tensorrt (trt-fp16): ")
    assert backend.artifact_key == "fp32"
    assert backend.selection.to_dict()["backend"] == backend.name


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
    assert set(FACTORIES) == {"onnxruntime-cpu", "onnxruntime-cuda", "openvino", "tensorrt"}


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
    data["artifacts"]["trt-fp32"] = Artifact(
        file="engines/model.engine",
        format="tensorrt",
        precision="fp32",
        tensorrt_version=trt.__version__,
        gpu=device.name(),
        compute_capability=cc,
        batch=(1, 8),
    ).to_dict()
    b = write_bundle(
        tmp_path / "bundle", Manifest.from_dict(data), {"model.onnx": onnx_path, "engines/model.engine": engine_path}
    )
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
    other = write_bundle(
        tmp_path / "other", Manifest.from_dict(data), {"model.onnx": onnx_path, "engines/model.engine": engine_path}
    )
    with pytest.raises(BackendError, match="compute capability 1.0"):
        create_backend(other, ModelConfig(bundle=other.path, backend="tensorrt"))


# ---- creation failures fall back (auto) ---------------------------------------------------------
class LogicError(RuntimeError):
    """Stands in for pycuda._driver.LogicError (not importable without CUDA)."""


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError("cuMemHostAlloc failed: out of memory"),
        LogicError("cuCtxPush failed: invalid device context"),
        AttributeError("'tensorrt.ICudaEngine' object has no attribute 'num_io_tensors'"),
    ],
    ids=["MemoryError", "LogicError", "old-TensorRT"],
)
def test_any_tensorrt_creation_failure_falls_back_to_onnxruntime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    def failing_tensorrt(bundle, key, cfg):
        raise exc

    def failing_openvino(bundle, key, cfg):
        raise RuntimeError("openvino compile failed")

    b = load_bundle(_with_fake_engine(tmp_path))
    monkeypatch.setitem(FACTORIES, "tensorrt", failing_tensorrt)
    monkeypatch.setitem(FACTORIES, "openvino", failing_openvino)  # so the next CPU candidate is ONNX Runtime
    backend = create_backend(b, ModelConfig(bundle=b.path, backend="auto"))
    import onnxruntime as ort

    assert backend.name in ("onnxruntime-cpu", "onnxruntime-cuda")
    assert isinstance(backend.sess, ort.InferenceSession)  # a real session, not a stand-in
    x = _batch(3)
    np.testing.assert_allclose(backend.run(x)[0], _reference(x), rtol=1e-4, atol=1e-5)
    sel = backend.selection
    assert sel.skipped[0] == f"tensorrt (trt-fp16): creation failed: {type(exc).__name__}: {exc}"
    assert any(s.startswith("openvino (fp32): ") for s in sel.skipped) or not X86
    # A named backend that fails this way is refused with a BackendError (the daemon reports it), never raw.
    with pytest.raises(BackendError, match=f"tensorrt \\(trt-fp16\\) could not be created: {type(exc).__name__}"):
        create_backend(b, ModelConfig(bundle=b.path, backend="tensorrt"))


# ---- accuracy record refusal ---------------------------------------------------------------------
def _with_record(tmp_path: Path, records: dict[str, dict]) -> Path:
    src = tiny_onnx(tmp_path / "src" / "model.onnx")
    data = manifest_dict()
    gate = {"split": "test", "n": 100, "budget_points": 0.5, "metrics": ["accuracy", "macro_f1"]}
    data["metrics"] = {
        "fp32": {
            "accuracy": 0.9,
            "backends": {
                k: {
                    "accuracy": 0.9 - v["drop"] / 100,
                    "inference_precision": k.partition(":")[2] or "f32",
                    "gate": {
                        **gate,
                        "passed": v["drop"] <= 0.5,
                        "failed": ["accuracy"] if v["drop"] > 0.5 else [],
                        "drops_points": {"accuracy": v["drop"], "macro_f1": 0.0},
                    },
                }
                for k, v in records.items()
            },
        }
    }
    return write_bundle(tmp_path / "bundle", Manifest.from_dict(data), {"model.onnx": src}).path


@needs_ov
@pytest.mark.skipif(not X86, reason="auto picks OpenVINO on x86 CPUs only")
def test_auto_order_prefers_openvino_over_ort_cpu_and_records_why(tmp_path: Path) -> None:
    b = load_bundle(_with_record(tmp_path, {"openvino:f32": {"drop": 0.2}, "onnxruntime": {"drop": 0.0}}))
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("ONNX Runtime CUDA comes before OpenVINO here")
    backend = create_backend(b, ModelConfig(bundle=b.path))
    sel = backend.selection
    assert (sel.backend, sel.artifact, sel.inference_precision) == ("openvino", "fp32", "f32")
    assert sel.reason == "first usable in auto order tensorrt > onnxruntime-cuda > openvino > onnxruntime-cpu"
    assert sel.skipped == ("onnxruntime-cuda (fp32): no CUDA provider in this onnxruntime build",)
    assert sel.accuracy["gate"]["passed"] is True
    assert "openvino (fp32, fp32, inference f32)" in sel.summary()


@needs_ov
@pytest.mark.skipif(not X86, reason="auto picks OpenVINO on x86 CPUs only")
def test_auto_refuses_a_backend_outside_its_recorded_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = load_bundle(_with_record(tmp_path, {"openvino:f32": {"drop": 1.25}}))
    with caplog.at_level("WARNING", logger="defectscope.backends"):
        backend = create_backend(b, ModelConfig(bundle=b.path))
    assert backend.name in ("onnxruntime-cpu", "onnxruntime-cuda")
    refused = [s for s in backend.selection.skipped if s.startswith("openvino (fp32): refused: ")]
    assert refused and "budget of 0.5 points" in refused[0] and "accuracy -1.25" in refused[0]
    assert any("backend openvino (fp32, openvino:f32) refused" in r.getMessage() for r in caplog.records)
    # Named: refused too (the bundle says this combination is not accurate enough), with the reason.
    with pytest.raises(BackendError, match="accuracy record fails the budget"):
        create_backend(b, ModelConfig(bundle=b.path, backend="openvino"))
    # The record is per inference precision: bf16 failing does not refuse f32.
    other = load_bundle(_with_record(tmp_path / "o", {"openvino:bf16": {"drop": 3.0}}))
    assert create_backend(other, ModelConfig(bundle=other.path, backend="openvino")).inference_precision == "f32"


def test_failing_onnxruntime_record_refuses_ort(tmp_path: Path) -> None:
    b = load_bundle(_with_record(tmp_path, {"onnxruntime": {"drop": 2.0}}))
    with pytest.raises(BackendError, match="onnxruntime-cpu \\(fp32\\): the bundle's accuracy record fails"):
        create_backend(b, ModelConfig(bundle=b.path, backend="onnxruntime-cpu"))


# ---- OpenVINO on real compiled models ------------------------------------------------------------
def _ov(b, **kw) -> ModelConfig:
    threads = kw.pop("threads", 1)
    return ModelConfig(bundle=b.path, backend="openvino", threads=threads, openvino=OpenVINOConfig(**kw))


@needs_ov
@pytest.mark.parametrize("requests", [1, 3])
def test_openvino_runs_the_model(tmp_path: Path, requests: int) -> None:
    b = load_bundle(make_bundle(tmp_path / "b"))
    backend = create_backend(
        b, _ov(b, threads=requests, infer_requests=requests, hint="throughput" if requests > 1 else "latency")
    )
    try:
        for n in (1, 2, 7):  # 2 < requests: fewer chunks than requests
            x = _batch(n, seed=n)
            (logits,) = backend.run(x)
            assert logits.shape == (n, 2) and logits.dtype == np.float32
            np.testing.assert_allclose(logits, _reference(x), rtol=1e-4, atol=1e-5)
        d = backend.describe()
        assert (d["backend"], d["artifact"], d["inference_precision"], d["max_batch"]) == (
            "openvino",
            "fp32",
            "f32",
            None,
        )
        # One stream per request, as many as OpenVINO allows (it caps threads, then streams, at the cores).
        assert d["streams"] == min(requests, os.cpu_count() or 1) and d["loaded_from_cache"] is False
        assert backend.accuracy_id == "openvino:f32"
    finally:
        backend.close()


@needs_ov
def test_openvino_static_batch_is_padded_and_split(tmp_path: Path) -> None:
    b = load_bundle(make_bundle(tmp_path / "b", static_batch=4))
    backend = create_backend(b, _ov(b, infer_requests=2))
    assert (backend.max_batch, backend.fixed_batch) == (4, True)
    for n in (1, 4, 9):
        x = _batch(n, seed=n)
        np.testing.assert_allclose(backend.run(x)[0], _reference(x), rtol=1e-4, atol=1e-5)


@needs_ov
def test_openvino_compiled_model_cache_is_reused_and_keyed_on_content(tmp_path: Path) -> None:
    cache = tmp_path / "ov-cache"
    b = load_bundle(make_bundle(tmp_path / "b"))
    first = create_backend(b, _ov(b, cache_dir=cache))
    blobs = sorted(cache.iterdir())
    assert first.describe()["loaded_from_cache"] is False and blobs
    stamps = {p: p.stat().st_mtime_ns for p in blobs}
    first.close()
    again = create_backend(load_bundle(b.path), _ov(b, cache_dir=cache))  # a restart
    assert again.describe()["loaded_from_cache"] is True
    assert {p: p.stat().st_mtime_ns for p in sorted(cache.iterdir())} == stamps  # nothing recompiled
    x = _batch(4)
    np.testing.assert_allclose(again.run(x)[0], _reference(x), rtol=1e-4, atol=1e-5)
    # The same bundle path rewritten with another model: compiled afresh, never the stale blob.
    rewritten = load_bundle(make_bundle(tmp_path / "b2", gain=-2.0))
    moved = tmp_path / "b"
    import shutil

    shutil.rmtree(moved)
    shutil.copytree(rewritten.path, moved)
    fresh = create_backend(load_bundle(moved), _ov(b, cache_dir=cache))
    assert fresh.describe()["loaded_from_cache"] is False
    np.testing.assert_allclose(fresh.run(x)[0], _reference(x, gain=-2.0), rtol=1e-4, atol=1e-5)


@needs_ov
def test_openvino_bf16_is_explicit_and_recorded(tmp_path: Path) -> None:
    import openvino as ov

    b = load_bundle(make_bundle(tmp_path / "b"))
    backend = create_backend(b, _ov(b, precision="bf16"))
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert backend.inference_precision == ("bf16" if has_bf16 else "f32")
    assert backend.accuracy_id == f"openvino:{backend.inference_precision}"
    assert backend.selection.inference_precision == backend.inference_precision
    x = _batch(4)
    np.testing.assert_allclose(backend.run(x)[0], _reference(x), rtol=2e-2, atol=2e-2)  # bf16: ~3 digits


@needs_ov
def test_openvino_runs_an_int8_qdq_model(tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src = tiny_onnx(tmp_path / "src" / "model.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": _batch(4, seed=i)} for i in range(4)])

        def get_next(self):
            return next(self.it, None)

    q = tmp_path / "src" / "model.int8.onnx"
    quantize_static(
        str(src),
        str(q),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    data = manifest_dict()
    data["artifacts"]["int8"] = {"file": "model.int8.onnx", "format": "onnx", "precision": "int8"}
    data["default_artifact"] = "int8"
    b = write_bundle(tmp_path / "bundle", Manifest.from_dict(data), {"model.onnx": src, "model.int8.onnx": q})
    backend = create_backend(b, _ov(b))
    ort_int8 = create_backend(b, ModelConfig(bundle=b.path, backend="onnxruntime-cpu"))
    assert (backend.artifact_key, backend.precision) == ("int8", "int8")
    x = _batch(6)
    np.testing.assert_allclose(backend.run(x)[0], _reference(x), atol=0.1)
    np.testing.assert_allclose(backend.run(x)[0], ort_int8.run(x)[0], atol=0.05)


@needs_ov
def test_openvino_refuses_a_model_that_does_not_match_the_manifest(tmp_path: Path) -> None:
    src = tiny_onnx(tmp_path / "src" / "model.onnx")
    data = manifest_dict()
    data["output"]["names"] = ["scores"]
    write_bundle(tmp_path / "bundle", Manifest.from_dict(data), {"model.onnx": src}, check_graph=False)
    b = load_bundle(tmp_path / "bundle", check_graph=False)
    with pytest.raises(BackendError, match="no output named 'scores'"):
        create_backend(b, _ov(b))
    garbage = tmp_path / "src2" / "model.onnx"
    garbage.parent.mkdir()
    garbage.write_bytes(b"\x08\x07not a model")
    write_bundle(tmp_path / "bad", Manifest.from_dict(manifest_dict()), {"model.onnx": garbage}, check_graph=False)
    bad = load_bundle(tmp_path / "bad", check_graph=False)
    with pytest.raises(BackendError, match="OpenVINO could not compile the model"):
        create_backend(bad, _ov(bad))


# ---- [model.openvino] keys ------------------------------------------------------------------------
def _station(tmp_path: Path, model_extra: str) -> Path:
    (tmp_path / "replay").mkdir(exist_ok=True)
    p = tmp_path / "st.toml"
    p.write_text(f'[model]\nbundle = "b"\n{model_extra}\n[[cameras]]\nid = "c1"\nsource = "replay"\n')
    return p


def test_openvino_config_keys_and_defaults(tmp_path: Path) -> None:
    from runtime.config.station import load_config

    cfg = load_config(
        _station(
            tmp_path,
            'backend = "openvino"\nthreads = 2\n[model.openvino]\n'
            'cache_dir = "ovc"\nhint = "throughput"\nprecision = "bf16"\n'
            "infer_requests = 2\n",
        )
    )
    assert cfg.model.backend == "openvino" and cfg.model.threads == 2
    assert cfg.model.openvino == OpenVINOConfig(
        cache_dir=tmp_path / "ovc", hint="throughput", precision="bf16", infer_requests=2
    )
    assert cfg.to_dict()["model"]["openvino"]["cache_dir"] == str(tmp_path / "ovc")
    plain = load_config(_station(tmp_path, ""))
    assert plain.model.openvino == OpenVINOConfig() and plain.model.openvino.precision == "f32"


@pytest.mark.parametrize(
    "body, message",
    [
        ('[model.openvino]\nhint = "fast"', "key 'model.openvino.hint': expected one of ['latency', 'throughput']"),
        ('[model.openvino]\nprecision = "f16"', "key 'model.openvino.precision': expected one of ['f32', 'bf16']"),
        ("[model.openvino]\ninfer_requests = 0", "key 'model.openvino.infer_requests': expected an integer >= 1"),
        ("[model.openvino]\ncache_dir = 3", "key 'model.openvino.cache_dir': expected a string"),
        ("[model.openvino]\nthreads = 2", "unknown key(s) ['model.openvino.threads']"),
        ('backend = "openvno"', "key 'model.backend': expected one of"),
    ],
)
def test_openvino_config_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    from runtime.config.station import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_station(tmp_path, body))


@needs_ov
def test_openvino_refuses_a_cache_dir_others_can_write(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Attacker: a group/world-writable cache could hold a planted compiled blob; it is not used."""
    b = load_bundle(make_bundle(tmp_path / "b"))
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    shared.chmod(0o777)
    with caplog.at_level("WARNING", logger="defectscope.backends"):
        backend = create_backend(b, _ov(b, cache_dir=shared))
    assert "writable by group or others" in backend.describe()["cache_refused"]
    assert list(shared.iterdir()) == []  # nothing written, nothing loaded
    assert any("compiled-model cache not used" in r.getMessage() for r in caplog.records)
    x = _batch(2)
    np.testing.assert_allclose(backend.run(x)[0], _reference(x), rtol=1e-4, atol=1e-5)
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    assert create_backend(b, _ov(b, cache_dir=not_dir)).describe()["cache_refused"]
    fresh = tmp_path / "new" / "cache"
    ok = create_backend(b, _ov(b, cache_dir=fresh))
    assert ok.describe()["cache_refused"] is None and (fresh.stat().st_mode & 0o777) == 0o700


def test_a_failing_probe_counts_as_a_failed_candidate(tmp_path: Path) -> None:
    """The daemon's warm-up passed as ``probe``: a candidate that fails it is closed and the next one tried."""
    b = load_bundle(_with_fake_engine(tmp_path))
    tried = []

    def probe(backend) -> None:
        tried.append(backend.name)
        if backend.name != "onnxruntime-cpu":
            raise RuntimeError("warm-up inference failed")
        backend.run(_batch(1))

    backend = create_backend(b, ModelConfig(bundle=b.path), probe=probe)
    assert backend.name == "onnxruntime-cpu" and tried[-1] == "onnxruntime-cpu"
    assert all(
        s.endswith("creation failed: RuntimeError: warm-up inference failed")
        for s in backend.selection.skipped
        if s.split()[0] in tried
    )
    with pytest.raises(BackendError, match="could not be created: RuntimeError: warm-up"):
        create_backend(
            b,
            ModelConfig(bundle=b.path, backend="onnxruntime-cpu"),
            probe=lambda be: (_ for _ in ()).throw(RuntimeError("warm-up inference failed")),
        )
