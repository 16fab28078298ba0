"""uint8-input artifacts (calibration.graph_input): the normalisation inside the ONNX graph gives the
float path's outputs on real ONNX Runtime and OpenVINO sessions, for RGB / BGR / gray specs and a
non-square input (a wrong layout or channel order changes the outputs); export and calibrate add
the twins (INT8 included) with their parity recorded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from calibration.graph_input import GraphInputError, add_uint8_input, check_uint8_parity, write_uint8_artifact
from runtime.inference.preprocess import InputSpec, Preprocessor

HAVE_OV = importlib.util.find_spec("openvino") is not None
H, W = 24, 32  # non-square: a transposed layout cannot pass


def _conv_model(path: Path, channels: int, seed: int = 0) -> Path:
    """(N,C,H,W) -> Conv 3x3 (random, per-channel weights) -> GAP -> Gemm -> logits (N,3)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (4, channels, 3, 3)).astype(np.float32), "cw"),
        numpy_helper.from_array(rng.normal(0, 1, (4, 3)).astype(np.float32), "gw"),
        numpy_helper.from_array(np.zeros(3, np.float32), "gb"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "cw"], ["c"], pads=[0, 0, 0, 0]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, H, W])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _spec(order: str) -> InputSpec:
    c = 1 if order == "GRAY" else 3
    return InputSpec(
        height=H,
        width=W,
        resize_size=W,
        mean=(0.2, 0.5, 0.7)[:c],
        std=(0.3, 0.2, 0.25)[:c],
        channels=c,
        color_order=order,
        resize_policy="stretch",
        interpolation="linear_exact",
    )


def _frames(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Camera-sized BGR frames and one gray frame: the resize runs on the CPU before either path.
    out = [rng.integers(0, 256, (48 + 8 * i, 60, 3), dtype=np.uint8) for i in range(n - 1)]
    return out + [rng.integers(0, 256, (40, 50), dtype=np.uint8)]


@pytest.mark.parametrize("order", ["RGB", "BGR", "GRAY"])
def test_uint8_artifact_matches_the_float_path_on_onnxruntime(tmp_path: Path, order: str) -> None:
    spec = _spec(order)
    src = _conv_model(tmp_path / "model.onnx", spec.channels)
    dest = tmp_path / "model.u8.onnx"
    write_uint8_artifact(src, dest, spec)
    report = check_uint8_parity(src, dest, spec, _frames(6))
    assert report.passed, report.summary()
    assert report.max_abs_diff <= 1e-4 and report.differing_top1 == 0


def test_a_wrong_channel_order_fails_parity(tmp_path: Path) -> None:
    """The check can fail: an artifact wrapped for BGR, judged as the RGB model's twin, disagrees."""
    src = _conv_model(tmp_path / "model.onnx", 3)
    dest = tmp_path / "model.u8.onnx"
    write_uint8_artifact(src, dest, _spec("BGR"))
    report = check_uint8_parity(src, dest, _spec("RGB"), _frames(6))
    assert not report.passed and report.max_abs_diff > 1e-2


def test_wrapping_twice_or_a_foreign_input_is_refused(tmp_path: Path) -> None:
    import onnx

    spec = _spec("RGB")
    src = _conv_model(tmp_path / "model.onnx", 3)
    wrapped = add_uint8_input(onnx.load(str(src)), spec)
    with pytest.raises(GraphInputError, match="not float32"):
        add_uint8_input(wrapped, spec)
    with pytest.raises(GraphInputError, match="expected one graph input 'pixels'"):
        add_uint8_input(onnx.load(str(src)), InputSpec(**{**spec.to_dict(), "name": "pixels"}))


@pytest.mark.skipif(not HAVE_OV, reason="openvino is not installed (extra 'openvino'; make test installs it)")
@pytest.mark.parametrize("order", ["RGB", "GRAY"])
def test_uint8_artifact_matches_the_float_path_on_openvino(tmp_path: Path, order: str) -> None:
    from runtime.inference.openvino import OpenVINOModel
    from runtime.inference.ort_session import ort_session

    spec = _spec(order)
    src = _conv_model(tmp_path / "model.onnx", spec.channels)
    dest = tmp_path / "model.u8.onnx"
    write_uint8_artifact(src, dest, spec)
    pre = Preprocessor(spec)
    frames = _frames(5)
    ref = ort_session(src, 1).run(None, {"input": pre.batch(frames)})[0]
    ov = OpenVINOModel(dest, ["logits"], input_name="input")
    assert ov.inputs[0].type == "u8" and ov.inputs[0].shape[1:] == [H, W, spec.channels]
    got = ov.run(np.stack([pre.frame_uint8(f) for f in frames]))[0]
    ov.close()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_export_and_calibrate_add_parity_checked_uint8_twins(tmp_path: Path, run_dir: Path) -> None:
    """``export --uint8-input`` adds fp32-u8; ``calibrate`` then adds int8-u8 (the INT8 graph behind the same
    in-graph normalisation); the station's loader accepts both and they predict like their float twins."""
    from calibration.cli import calibrate_main, export_main
    from runtime.bundle.load import load_bundle
    from runtime.inference.ort_session import ort_session

    out = tmp_path / "b"
    assert export_main([str(run_dir), "--out", str(out), "--threads", "1", "--uint8-input", "--no-eval"]) == 0
    b = load_bundle(out)
    assert b.artifact("fp32-u8").input == "uint8_nhwc" and b.artifact("fp32").input == "float32_nchw"
    assert b.manifest.provenance["export"]["uint8_parity"]["fp32-u8"]["passed"] is True
    assert "input" not in b.manifest.to_dict()["artifacts"]["fp32"]  # float artifacts serialise as before
    b.check_onnx("fp32-u8")
    cal = tmp_path / "c"
    args = [str(out), "--out", str(cal), "--size", "24", "--threads", "1", "--method", "minmax", "--no-fallback"]
    assert calibrate_main(args) == 0
    c = load_bundle(cal)
    assert c.artifact("int8-u8").input == "uint8_nhwc" and c.artifact("int8-u8").precision == "int8"
    assert c.manifest.provenance["export"]["uint8_parity"]["int8-u8"]["passed"] is True
    pre = Preprocessor(c.manifest.input)
    frames = [np.random.default_rng(i).integers(0, 256, (70, 90, 3), dtype=np.uint8) for i in range(4)]
    f = ort_session(c.artifact_path("int8"), 1).run(None, {"input": pre.batch(frames)})[0]
    x_u8 = np.stack([pre.frame_uint8(x) for x in frames])
    u = ort_session(c.artifact_path("int8-u8"), 1).run(None, {"input": x_u8})[0]
    assert (f.argmax(1) == u.argmax(1)).all()
