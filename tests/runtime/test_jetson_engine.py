"""Jetson engines up to the device calls: the L4T / JetPack record and the refusal of an engine built
for another JetPack, DLA core decisions and the build plan (uint8 input from the -u8 twin, --dla-core),
the runtime's DLA core choice, buffer plans, the accuracy gate driving a uint8-input artifact with a
float held-out sample, and [model] dla_core. The GPU test (uint8 engine, staged double-buffered
batches, against ONNX Runtime) runs only with TensorRT + pycuda + a CUDA GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.bundle.load import load_bundle
from runtime.bundle.manifest import Artifact, Manifest
from runtime.engine.build import BuildError, artifact_fields
from runtime.engine.dla import dla_decision
from runtime.engine.meta import (
    EngineMismatchError,
    Platform,
    check_engine,
    describe_l4t,
    engine_problems,
    parse_l4t,
    read_l4t,
)
from runtime.engine.plan import plan_build
from runtime.inference.preprocess import InputSpec, Preprocessor

from ._helpers import SIZE, manifest_dict

# /etc/nv_tegra_release as JetPack 6.0 (Orin), 5.1.2 (Orin / Xavier) and 4.6 (Nano / TX2) write it.
ORIN_JP6 = (
    "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 23:24:25 UTC 2024"
)
XAVIER_JP5 = (
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023"
)
NANO_JP4 = (
    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022"
)

ORIN = Platform("10.3.0.30", "Orin", "8.7", l4t="36.3.0")


def _engine(**extra) -> Artifact:
    return Artifact(
        file="engines/model.int8.engine",
        format="tensorrt",
        precision="int8",
        tensorrt_version="10.3.0.30",
        gpu="Orin",
        compute_capability="8.7",
        batch=(1, 8),
        extra=extra,
    )


def test_l4t_release_is_read_from_nv_tegra_release(tmp_path: Path) -> None:
    assert [parse_l4t(t) for t in (ORIN_JP6, XAVIER_JP5, NANO_JP4)] == ["36.3.0", "35.4.1", "32.7.1"]
    assert parse_l4t("Ubuntu 22.04.4 LTS") is None
    f = tmp_path / "nv_tegra_release"
    f.write_text(XAVIER_JP5 + "\n# KERNEL_VARIANT: oot\n")
    assert read_l4t(str(f)) == "35.4.1" and read_l4t(str(tmp_path / "absent")) is None
    assert describe_l4t("36.3.0") == "L4T 36.3.0 (JetPack 6.0)" and describe_l4t(None) == "not a Jetson (no L4T)"


def test_an_engine_built_on_another_jetpack_is_refused_with_the_rebuild_command() -> None:
    art = _engine(l4t="35.4.1", build={"precision": "int8", "input": "uint8_nhwc"}, dla={"requested": 0, "core": 0})
    problems = engine_problems(art, ORIN)
    assert problems == ["built on L4T 35.4.1 (JetPack 5.1.2), this device runs L4T 36.3.0 (JetPack 6.0)"]
    with pytest.raises(EngineMismatchError) as err:
        check_engine(art, ORIN, "/opt/b", "trt-int8")
    assert "--input uint8" in str(err.value) and "--dla-core 0" in str(err.value)
    x86 = Platform("10.3.0.30", "Orin", "8.7")  # same TensorRT and GPU name, but no L4T: not that Jetson
    assert "this device runs not a Jetson (no L4T)" in engine_problems(art, x86)[0]
    assert engine_problems(_engine(l4t="36.3.0"), ORIN) == []
    assert engine_problems(_engine(), ORIN) == []  # engines from before the L4T record: TensorRT + GPU only


def test_dla_decision_says_why_the_gpu_builds_instead() -> None:
    assert dla_decision(None, 2, "int8") == (None, None)
    assert dla_decision(1, 2, "int8") == (1, None)
    assert dla_decision(0, 2, "fp16") == (0, None)
    core, why = dla_decision(0, 0, "int8")
    assert core is None and "has no DLA" in why
    core, why = dla_decision(2, 2, "int8")
    assert core is None and "has 2 (0..1)" in why
    assert "INT8 and FP16 only" in dla_decision(0, 2, "fp32")[1]


def _u8_manifest() -> Manifest:
    data = manifest_dict()
    arts = data["artifacts"]
    arts["fp32-u8"] = {"file": "model.u8.onnx", "format": "onnx", "precision": "fp32", "input": "uint8_nhwc"}
    q = {"activation_symmetric": True, "format": "qdq"}
    arts["int8-trt"] = {"file": "model.int8.trt.onnx", "format": "onnx", "precision": "int8", "quantization": q}
    arts["int8-trt-u8"] = {
        "file": "model.int8.trt.u8.onnx",
        "format": "onnx",
        "precision": "int8",
        "quantization": q,
        "input": "uint8_nhwc",
    }
    return Manifest.from_dict(data)


def test_build_plan_takes_the_uint8_twin_and_the_dla_core() -> None:
    m = _u8_manifest()
    fp16 = plan_build(m, "10.3.0", "fp16", input_kind="uint8_nhwc")
    assert (fp16.source_key, fp16.input_chw) == ("fp32-u8", (SIZE, SIZE, 3))
    assert plan_build(m, "10.3.0", "fp16").source_key == "fp32"  # the float engine stays the default
    int8 = plan_build(m, "10.3.0", "int8", input_kind="uint8_nhwc", dla_core=0)
    assert (int8.source_key, int8.dla_core) == ("int8-trt-u8", 0) and any("GPU fallback" in n for n in int8.notes)
    assert int8.profile()[2] == (8, SIZE, SIZE, 3)
    with pytest.raises(BuildError, match="DLA runs INT8 and FP16 only"):
        plan_build(m, "10.3.0", "fp32", dla_core=0)
    with pytest.raises(BuildError, match="DLA core number >= 0"):
        plan_build(m, "10.3.0", "int8", dla_core=-1)
    with pytest.raises(BuildError, match="implicit INT8 calibration is not supported"):
        plan_build(m, "8.6.1", "int8", input_kind="uint8_nhwc")
    with pytest.raises(BuildError, match="does not have"):
        plan_build(Manifest.from_dict(manifest_dict()), "10.3.0", "fp16", input_kind="uint8_nhwc")


def test_artifact_fields_record_the_jetpack_and_the_dla_outcome() -> None:
    plan = plan_build(_u8_manifest(), "10.3.0", "int8", input_kind="uint8_nhwc", dla_core=1)
    dla = {"requested": 1, "core": None, "available": 0, "fallback": "this device has no DLA"}
    fields = artifact_fields(plan, ORIN, 12.0, 2048, dla=dla)
    assert fields["l4t"] == "36.3.0" and fields["jetpack"] == "6.0" and fields["dla"] == dla
    assert fields["build"]["input"] == "uint8_nhwc"
    assert "l4t" not in artifact_fields(plan, Platform("10.3.0", "NVIDIA A2", "8.6"), 1.0, 2048)


def test_runtime_dla_core_choice_and_buffer_plans() -> None:
    from runtime.inference.backends import BackendError
    from runtime.inference.tensorrt import dla_core_for, plan_buffers

    assert dla_core_for(_engine(), None) is None
    assert dla_core_for(_engine(dla={"requested": 0, "core": 0}), None) == 0
    assert dla_core_for(_engine(dla={"requested": 0, "core": 0}), 1) == 1  # [model] dla_core picks the core
    assert dla_core_for(_engine(dla={"requested": 0, "core": None, "fallback": "no DLA"}), 1) is None
    plans = plan_buffers(
        {"input": ((8, 32, 32, 3), np.uint8), "logits": ((8, 2), np.float32)}, ["input", "logits"], "e"
    )
    assert plans[0].dtype == np.uint8 and plans[1].dims == (8, 2)
    with pytest.raises(BackendError, match="data-dependent shape"):
        plan_buffers({"boxes": ((1, -1, 4), np.float32)}, ["boxes"], "e")


def test_float_sample_drives_a_uint8_artifact_exactly() -> None:
    spec = InputSpec(8, 10, 10, mean=(0.2, 0.4, 0.6), std=(0.3, 0.2, 0.25), resize_policy="stretch")
    pre = Preprocessor(spec)
    frames = np.random.default_rng(0).integers(0, 256, (4, 8, 10, 3), dtype=np.uint8)
    x = pre.batch(list(frames))
    np.testing.assert_array_equal(pre.uint8_from_tensor(x), frames)


def test_the_station_gate_runs_a_uint8_artifact_on_the_float_holdout(tmp_path: Path) -> None:
    """runtime.engine.gate feeds a uint8-input engine the held-out sample as uint8 frames (ONNX Runtime stands
    in for the engine here): the same predictions as the FP32 reference, drop 0."""
    from runtime.config.types import ModelConfig
    from runtime.engine.gate import gate_backend, pack_holdout
    from runtime.inference.selection import create_backend
    from tests.runtime.test_uint8_input import _u8_bundle

    path = _u8_bundle(tmp_path)
    pre = Preprocessor(load_bundle(path).manifest.input)
    rng = np.random.default_rng(1)
    x = pre.batch([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(12)])
    pack_holdout(path, x)
    b = load_bundle(path)
    backend = create_backend(b, ModelConfig(bundle=b.path, backend="onnxruntime-cpu", artifact="fp32-u8"))
    report = gate_backend(b, backend, budget_points=0.0)
    backend.close()
    assert report.passed and report.drop_points == 0.0 and report.n == 12


def test_station_config_dla_core(tmp_path: Path) -> None:
    from runtime.config.station import ConfigError, load_config

    from ._helpers import make_bundle, station_config

    bundle = make_bundle(tmp_path / "b")
    (tmp_path / "r").mkdir()
    cam = [{"id": "cam1", "source": str(tmp_path / "r")}]
    config, _ = station_config(tmp_path, bundle, cam, model={"dla_core": 1})
    assert load_config(config).model.dla_core == 1
    config, _ = station_config(tmp_path, bundle, cam, model={"dla_core": -1})
    with pytest.raises(ConfigError, match="model.dla_core"):
        load_config(config)


def _gpu_or_skip() -> None:
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401

        cuda.init()
        if cuda.Device.count() < 1:
            pytest.skip("no CUDA device (pycuda sees 0 devices)")
    except ImportError as exc:
        pytest.skip(f"needs tensorrt + pycuda and a CUDA GPU: {exc}")
    except Exception as exc:  # pycuda.driver.Error: no driver / no device
        pytest.skip(f"CUDA is not usable here: {exc}")


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_uint8_engine_with_staged_batches_matches_onnxruntime(tmp_path: Path) -> None:
    """A uint8-input FP32 engine of the tiny bundle: staged (double-buffered) and unstaged batches, a pinned
    zero-copy arena, all equal to ONNX Runtime on the uint8 artifact."""
    _gpu_or_skip()
    from calibration.engine_cli import main as build_main
    from runtime.config.types import ModelConfig
    from runtime.inference.selection import create_backend
    from tests.runtime.test_uint8_input import _u8_bundle

    path = _u8_bundle(tmp_path)
    assert build_main([str(path), "--precision", "fp32", "--input", "uint8", "--batch", "1", "4"]) == 0
    b = load_bundle(path)
    assert b.artifact("trt-fp32").input == "uint8_nhwc"
    trt = create_backend(b, ModelConfig(bundle=b.path, backend="tensorrt", artifact="trt-fp32"))
    ort = create_backend(b, ModelConfig(bundle=b.path, backend="onnxruntime-cpu", artifact="fp32-u8"))
    try:
        rng = np.random.default_rng(2)
        arena = trt.allocate_host((4, SIZE, SIZE, 3), np.uint8)
        arena[...] = rng.integers(0, 256, arena.shape, dtype=np.uint8)
        batches = [arena, rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8), arena[:2]]
        for x in batches[:2]:
            trt.stage(x)  # both copies queued before either runs
        for x in batches:
            np.testing.assert_allclose(trt.run(x)[0], ort.run(x)[0], atol=1e-3)
    finally:
        trt.close()
        ort.close()
