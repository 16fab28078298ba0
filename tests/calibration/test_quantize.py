"""ONNX Runtime static QDQ quantization: agreement with FP32, per-channel weights, the two targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

# Tolerance for a trained 3-conv model on the crack task (64 test images): INT8 must pick the
# same class on >= 95% of images and keep logits within 15% RMS of the FP32 logit scale.
MIN_AGREEMENT = 0.95
MAX_REL_RMS = 0.15


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_int8_agrees_with_fp32_on_a_learnable_task(prepared, method, target):
    from calibration.evaluate import ort_session, predict_logits
    from calibration.quantize import QuantConfig, quantize_model

    float_model, x_cal, x_test, y, work = prepared
    cfg = QuantConfig(method=method, target=target, batch_size=16)
    out = quantize_model(float_model, work / f"{method}.{target}.onnx", cfg, work / f"ranges.{method}.json", x_cal)
    ref = predict_logits(ort_session(float_model, 1), x_test)
    got = predict_logits(ort_session(out, 1), x_test)
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    rel_rms = float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref**2)))
    assert agreement >= MIN_AGREEMENT, (agreement, rel_rms)
    assert rel_rms <= MAX_REL_RMS, (agreement, rel_rms)
    assert (got.argmax(1) == y).mean() >= 0.9
    # Not a silent no-op: the model really is quantized and differs from FP32.
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert 0 < np.abs(got - ref).max()


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_per_channel_weights_and_target_specific_activations(prepared):
    from calibration.quantize import QuantConfig, quantize_model

    float_model, x_cal, _, _, work = prepared
    convs = {n.name: n for n in onnx.load(str(float_model)).graph.node if n.op_type == "Conv"}
    for target, act_dtype in (("cpu", np.uint8), ("tensorrt", np.int8)):
        cfg = QuantConfig(method="minmax", target=target)
        out = quantize_model(float_model, work / f"pc.{target}.onnx", cfg, work / "ranges.pc.json", x_cal)
        model = onnx.load(str(out))
        inits = _initializers(model)
        producers = {o: n for n in model.graph.node for o in n.output}
        checked = 0
        for node in model.graph.node:
            if node.op_type != "Conv" or node.name not in convs:
                continue
            weight_dq = producers[node.input[1]]
            assert weight_dq.op_type == "DequantizeLinear"
            scale, zero = inits[weight_dq.input[1]], inits[weight_dq.input[2]]
            if target == "tensorrt":
                # Float weights behind Q->DQ (TensorRT quantizes them), float bias.
                weight_q = producers[weight_dq.input[0]]
                assert weight_q.op_type == "QuantizeLinear"
                weights = inits[weight_q.input[0]]
                assert weights.dtype == np.float32
                assert len(node.input) < 3 or inits[node.input[2]].dtype == np.float32
            else:
                weights = inits[weight_dq.input[0]]
                assert weights.dtype == np.int8
            out_channels = weights.shape[0]
            assert scale.shape == (out_channels,) and out_channels > 1  # one scale per output channel
            assert zero.dtype == np.int8 and not zero.any()  # symmetric int8 weights
            act_dq = producers[node.input[0]]
            assert act_dq.op_type == "DequantizeLinear"
            act_zero = inits[act_dq.input[2]]
            assert act_zero.dtype == act_dtype
            if target == "tensorrt":
                assert not act_zero.any()  # TensorRT needs zero points of 0
            checked += 1
        assert checked == len(convs) == 3
    cfg = QuantConfig(method="minmax", per_channel=False)
    flat = onnx.load(str(quantize_model(float_model, work / "pt.onnx", cfg, work / "ranges.pc.json", x_cal)))
    inits = _initializers(flat)
    w_scales = [
        inits[n.input[1]]
        for n in flat.graph.node
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(1)).ndim == 4
    ]
    assert w_scales and all(s.size == 1 for s in w_scales)


def test_ranges_cache_is_reused(prepared):
    from calibration.quantize import QuantConfig, QuantizationError, quantize_model

    float_model, x_cal, _, _, work = prepared
    cache = work / "ranges.reuse.json"
    cfg = QuantConfig(method="minmax")
    a = quantize_model(float_model, work / "a.onnx", cfg, cache, x_cal)
    assert cache.is_file()
    b = quantize_model(float_model, work / "b.onnx", cfg, cache, None)  # no images needed any more
    assert Path(a).read_bytes() == Path(b).read_bytes()
    with pytest.raises(QuantizationError, match="needs images"):
        quantize_model(float_model, work / "c.onnx", cfg, work / "fresh.json", None)


def test_graph_inspection_and_sensitivity(prepared):
    from calibration.quantize import (
        QuantConfig,
        compute_nodes,
        fallback_order,
        layer_sensitivity,
        quantize_model,
        stem_and_classifier,
    )

    float_model, x_cal, _, _, work = prepared
    nodes = compute_nodes(float_model)
    assert [n.op_type for n in nodes] == ["Conv", "Conv", "Conv", "Gemm"]
    stem, classifier = stem_and_classifier(float_model)
    assert stem == nodes[0].name and classifier == nodes[-1].name
    cfg = QuantConfig(method="minmax")
    cache = work / "ranges.sens.json"
    quantize_model(float_model, work / "s.onnx", cfg, cache, x_cal)
    sens = layer_sensitivity(float_model, cfg, cache, x_cal[:16], nodes, threads=1)
    assert set(sens) == {n.name for n in nodes} and all(v >= 0 for v in sens.values())
    assert any(v > 0 for v in sens.values())
    order = fallback_order(float_model, sens)
    assert order[:2] == [stem, classifier] and sorted(order) == sorted(sens)
    rest = order[2:]
    assert [sens[n] for n in rest] == sorted((sens[n] for n in rest), reverse=True)


def test_bad_config_is_refused():
    from calibration.quantize import QuantConfig, QuantizationError

    with pytest.raises(QuantizationError, match="calibration method"):
        QuantConfig(method="kl")
    with pytest.raises(QuantizationError, match="quantization target"):
        QuantConfig(target="gpu")
