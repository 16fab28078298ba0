"""Real TensorRT builds of the tiny bundle; skipped (with the reason) without TensorRT + a CUDA GPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]


@pytest.fixture(scope="module")
def platform():
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install
        pytest.skip(f"TensorRT is not importable here: {exc}")
    from runtime.engine.meta import EngineUnavailableError, current_platform

    try:
        return current_platform()
    except EngineUnavailableError as exc:
        pytest.skip(str(exc))


def _run_engine(engine_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Execute an engine on (N,C,H,W) float32 with pycuda (TensorRT >= 8.5 tensor API)."""
    cuda = pytest.importorskip("pycuda.driver")
    pytest.importorskip("pycuda.autoinit")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    ctx = engine.create_execution_context()
    if not hasattr(ctx, "set_input_shape"):
        pytest.skip("TensorRT < 8.5: no tensor-address API to run the engine in this test")
    x = np.ascontiguousarray(x, dtype=np.float32)
    ctx.set_input_shape("input", x.shape)
    out = np.empty(tuple(ctx.get_tensor_shape("logits")), dtype=np.float32)
    d_in, d_out = cuda.mem_alloc(x.nbytes), cuda.mem_alloc(out.nbytes)
    stream = cuda.Stream()
    cuda.memcpy_htod_async(d_in, x, stream)
    ctx.set_tensor_address("input", int(d_in))
    ctx.set_tensor_address("logits", int(d_out))
    assert ctx.execute_async_v3(stream.handle)
    cuda.memcpy_dtoh_async(out, d_out, stream)
    stream.synchronize()
    return out


def _reference(bundle, splits):
    from calibration.evaluate import ort_session
    from runtime.inference.preprocess import Preprocessor

    x = Preprocessor(bundle.manifest.input).load_batch([s.path for s in splits.test[:8]])
    return x, ort_session(bundle.artifact_path("fp32"), 1).run(None, {"input": x})[0]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_float_engine_into_bundle(platform, calibrated, splits, tmp_path, precision):
    from calibration.engine_cli import main
    from runtime.bundle.load import load_bundle
    from runtime.engine.meta import check_engine, version_tuple

    if precision == "fp16" and version_tuple(platform.tensorrt_version)[0] >= 11:
        pytest.skip("TensorRT 11 has no FP16 flag for FP32 ONNX models")
    bundle = tmp_path / "b"
    shutil.copytree(calibrated, bundle)
    timing = tmp_path / "timing.cache"
    assert main([str(bundle), "--precision", precision, "--batch", "1", "8", "--timing-cache", str(timing)]) == 0
    b = load_bundle(bundle)
    art = b.manifest.artifacts[f"trt-{precision}"]
    assert art.tensorrt_version == platform.tensorrt_version and art.gpu == platform.gpu
    assert art.compute_capability == platform.compute_capability and art.batch == (1, 8)
    check_engine(art, platform, str(bundle), f"trt-{precision}")
    assert timing.is_file() and timing.stat().st_size > 0
    x, ref = _reference(b, splits)
    got = _run_engine(b.artifact_path(f"trt-{precision}").read_bytes(), x)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert np.abs(got - ref).max() < (1e-3 if precision == "fp32" else 5e-2)
    # A second build reuses the timing cache.
    assert main([str(bundle), "--precision", precision, "--timing-cache", str(timing), "--key", "again"]) == 0


def test_build_int8_engine(platform, calibrated, splits, tmp_path):
    from calibration.engine_cli import main
    from runtime.bundle.load import load_bundle
    from runtime.engine.meta import version_tuple

    bundle = tmp_path / "b"
    shutil.copytree(calibrated, bundle)
    args = [str(bundle), "--precision", "int8", "--batch", "1", "8", "--no-timing-cache"]
    implicit = version_tuple(platform.tensorrt_version)[0] < 10
    if implicit:
        from calibration.calibset import CalibrationSet, save_tensor

        calib = CalibrationSet.from_dict(json.loads((bundle / "calibration.json").read_text()))
        npy = save_tensor(tmp_path / "calib.npy", calib.tensor(), calib)
        args += ["--calibration-data", str(npy), "--calib-batch-size", "8"]
    assert main(args) == 0
    b = load_bundle(bundle)
    art = b.manifest.artifacts["trt-int8"]
    assert art.extra["build"]["int8_mode"] == ("implicit" if implicit else "explicit")
    if implicit:
        assert art.extra["calibration_cache"] in b.manifest.files  # shipped for the next build
        # Rebuild from the cache alone: no calibration images needed any more.
        assert main([str(bundle), "--precision", "int8", "--no-timing-cache", "--key", "from-cache"]) == 0
    x, ref = _reference(b, splits)
    got = _run_engine(b.artifact_path("trt-int8").read_bytes(), x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.85
