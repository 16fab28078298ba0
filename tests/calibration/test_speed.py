"""Speed-aware float prefix: parsing, fixed and timed choice, and its place in the gate pipeline."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def quant(prepared):
    """(prepared float model, calibration tensor, calibration ranges cache, compute node names, work dir)."""
    from calibration.quantize import QuantConfig, compute_nodes, quantize_model

    float_model, x_cal, _, _, work = prepared
    ranges = work / "ranges.speed.json"
    quantize_model(float_model, work / "speed.all.onnx", QuantConfig(method="minmax"), ranges, x_cal)
    return float_model, x_cal, ranges, [n.name for n in compute_nodes(float_model)], work


def _float_convs(path) -> set[str]:
    """Conv nodes whose weight is a plain float initializer (not behind DequantizeLinear)."""
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    return {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits}


@pytest.mark.parametrize("text, max_prefix, fixed", [("auto", 4, None), ("AUTO:2", 2, None), ("0", 4, 0), ("3", 4, 3)])
def test_parse(text, max_prefix, fixed):
    from calibration.speed import SpeedSettings

    s = SpeedSettings.parse(text)
    assert (s.max_prefix, s.fixed) == (max_prefix, fixed)


@pytest.mark.parametrize("text", ["fast", "auto:x", "-1"])
def test_parse_refuses_bad_values(text):
    from calibration.speed import SpeedSettings

    with pytest.raises(ValueError, match="float.prefix"):
        SpeedSettings.parse(text)


def test_fixed_prefix_is_untimed_and_bounded(quant):
    from calibration.quantize import QuantConfig
    from calibration.speed import SpeedSettings, search_float_prefix

    prepared, x_cal, ranges, nodes, _ = quant
    got = search_float_prefix(prepared, QuantConfig(method="minmax"), ranges, x_cal, SpeedSettings(fixed=2))
    assert got.float_nodes == tuple(nodes[:2]) and not got.measured and got.trials == []
    with pytest.raises(ValueError, match=f"only {len(nodes)} compute layers"):
        search_float_prefix(prepared, QuantConfig(method="minmax"), ranges, x_cal, SpeedSettings(fixed=len(nodes) + 1))


def test_timed_search_measures_every_prefix_and_needs_a_real_gain(quant):
    from calibration.quantize import QuantConfig
    from calibration.speed import SpeedSettings, search_float_prefix

    prepared, x_cal, ranges, nodes, _ = quant
    cfg = QuantConfig(method="minmax")
    fast = SpeedSettings(max_prefix=2, batch=4, repeats=3, rounds=1, min_gain=0.0)
    got = search_float_prefix(prepared, cfg, ranges, x_cal[:3], fast, threads=1)
    assert got.measured and [t["prefix"] for t in got.trials] == [0, 1, 2]
    assert all(t["img_per_s"] > 0 for t in got.trials)
    rates = {t["prefix"]: t["img_per_s"] for t in got.trials}
    # min_gain 0: the measured fastest prefix wins (ties go to fewer float layers).
    assert len(got.float_nodes) == max(rates, key=lambda k: (rates[k], -k))
    assert got.float_nodes == tuple(nodes[: len(got.float_nodes)])
    # An impossible margin keeps everything INT8 whatever the timings.
    strict = SpeedSettings(max_prefix=2, batch=4, repeats=3, rounds=1, min_gain=100.0)
    assert search_float_prefix(prepared, cfg, ranges, x_cal, strict, threads=1).float_nodes == ()


def test_pipeline_keeps_the_prefix_in_float_and_records_why(quant, splits, exported):
    from calibration.calibset import preprocess_paths
    from calibration.pipeline import EvalData, GateSettings, quantize_and_gate
    from calibration.quantize import QuantConfig
    from calibration.speed import SpeedSettings
    from runtime.bundle.load import load_bundle

    prepared, x_cal, ranges, nodes, work = quant
    spec = load_bundle(exported).manifest.input
    data = EvalData(
        x=preprocess_paths([s.path for s in splits.test], spec),
        y=[s.label for s in splits.test],
        classes=splits.classes,
        split="test",
        threads=1,
    )
    ref = data.evaluate(prepared)
    out = quantize_and_gate(
        prepared,
        ref,
        x_cal,
        data,
        QuantConfig(method="minmax"),
        ranges,
        work / "cpu.onnx",
        GateSettings(budget=100.0, metrics=("accuracy",)),
        log=lambda _: None,
        speed=SpeedSettings(fixed=1),
    )
    assert out.passed and out.float_nodes == [nodes[0]]
    assert nodes[0] in _float_convs(out.path)
    assert _float_convs(out.path) <= {nodes[0]}  # everything after the prefix is INT8
    record = out.quantization_record("f" * 16, len(x_cal))
    assert record["float_nodes"] == [nodes[0]]
    assert record["float_for_speed"]["nodes"] == [nodes[0]] and record["float_prefix"] == 1
    # The TensorRT target never takes the CPU timing choice (TensorRT picks precisions itself).
    trt = quantize_and_gate(
        prepared,
        ref,
        x_cal,
        data,
        QuantConfig(method="minmax", target="tensorrt"),
        ranges,
        work / "trt.onnx",
        GateSettings(budget=100.0, metrics=("accuracy",)),
        log=lambda _: None,
        speed=SpeedSettings(fixed=1),
    )
    assert trt.float_nodes == [] and trt.speed is None
