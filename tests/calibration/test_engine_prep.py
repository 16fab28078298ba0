"""Everything up to the TensorRT builder call, on CPU: plans, calibration batches, caches,
engine metadata and the refusal of engines built for another TensorRT / GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")


# -- build plans ---------------------------------------------------------------------------
def test_plans_per_tensorrt_generation(calibrated, exported):
    from runtime.bundle.load import load_bundle
    from runtime.engine.build import BuildError
    from runtime.engine.plan import plan_build

    m = load_bundle(calibrated).manifest
    jp5 = plan_build(m, "8.5.2.2", "int8", batch=(1, 8))
    assert jp5.int8_mode == "implicit" and jp5.source_key == "fp32" and jp5.source_file == "model.onnx"
    assert jp5.network_flags == ("EXPLICIT_BATCH",) and jp5.builder_flags == ("INT8", "FP16")
    assert jp5.profile() == ((1, 3, 32, 32), (8, 3, 32, 32), (8, 3, 32, 32))
    assert jp5.calibration_shape() == (8, 3, 32, 32)

    jp6 = plan_build(m, "10.3.0.30", "int8", batch=(1, 16), opt_batch=4)
    assert jp6.int8_mode == "explicit" and jp6.source_key == "int8-trt"  # symmetric QDQ, not the U8 one
    assert jp6.network_flags == () and jp6.builder_flags == ("INT8", "FP16")
    assert jp6.profile()[1] == (4, 3, 32, 32)
    typed = plan_build(m, "10.3.0", "int8", strongly_typed=True)
    assert typed.network_flags == ("STRONGLY_TYPED",) and typed.builder_flags == ()
    assert plan_build(m, "8.6.1", "int8", int8_mode="explicit").source_key == "int8-trt"
    assert plan_build(m, "10.3.0", "int8", int8_mode="implicit").notes  # deprecated there, said so

    fp16 = plan_build(m, "8.6.1", "fp16")
    assert fp16.builder_flags == ("FP16",) and fp16.source_key == "fp32" and fp16.int8_mode is None
    assert plan_build(m, "11.0.0", "fp32").network_flags == ("STRONGLY_TYPED",)
    assert plan_build(m, "11.0.0", "int8").source_key == "int8-trt"

    cases = [
        (dict(tensorrt_version="11.0.0", precision="fp16"), "FP16 on a strongly typed network"),
        (dict(tensorrt_version="11.0.0", precision="int8", int8_mode="implicit"), "removed implicit INT8"),
        (dict(tensorrt_version="8.6.1", precision="fp16", strongly_typed=True), "needs TensorRT 10"),
        (dict(tensorrt_version="7.2.3", precision="fp16"), "too old"),
        (dict(tensorrt_version="10.3.0", precision="fp16", batch=(4, 2)), "1 <= MIN <= MAX"),
        (dict(tensorrt_version="10.3.0", precision="fp16", batch=(1, 8), opt_batch=9), "must lie within"),
        (dict(tensorrt_version="10.3.0", precision="bf16"), "--precision"),
    ]
    for kw, message in cases:
        with pytest.raises(BuildError, match=message):
            plan_build(m, **kw)
    # Explicit INT8 without a TensorRT-compatible QDQ model says how to make one.
    with pytest.raises(BuildError, match="calibrate .* --target tensorrt"):
        plan_build(load_bundle(exported).manifest, "10.3.0", "int8", bundle_hint=str(exported))


def test_build_engine_cli_dry_run_and_missing_tensorrt(calibrated, capsys):
    from calibration.engine_cli import main

    assert (
        main([str(calibrated), "--precision", "int8", "--dry-run", "--tensorrt-version", "8.5.2", "--batch", "1", "4"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["key"] == "trt-int8" and out["file"] == "engines/model.int8.engine"
    assert out["plan"]["int8_mode"] == "implicit" and out["plan"]["batch"] == [1, 4]
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the missing-TensorRT message does not apply")
    except ImportError:
        pass
    assert main([str(calibrated), "--precision", "fp16"]) == 1
    msg = capsys.readouterr().out
    assert "TensorRT is not importable" in msg and "--dry-run --tensorrt-version" in msg


# -- calibration batches and cache ---------------------------------------------------------
def test_batch_stream_serves_every_image_at_fixed_shape():
    from calibration.calibrator import BatchStream

    x = np.arange(10 * 3 * 2 * 2, dtype=np.float32).reshape(10, 3, 2, 2)
    s = BatchStream(x, 4)
    batches = list(s)
    assert s.n_batches == 3 and [b.shape for b in batches] == [(4, 3, 2, 2)] * 3
    assert all(b.flags["C_CONTIGUOUS"] and b.dtype == np.float32 for b in batches)
    served = np.concatenate(batches)
    np.testing.assert_array_equal(served[:10], x)  # every image, in order
    np.testing.assert_array_equal(served[10:], x[:2])  # the last batch wraps around
    assert s.next_batch() is None and s.nbytes == 4 * 3 * 2 * 2 * 4
    s.reset()
    np.testing.assert_array_equal(s.next_batch(), x[:4])
    with pytest.raises(ValueError, match="non-empty"):
        BatchStream(np.zeros((0, 3, 2, 2), np.float32), 2)


def _cache_bytes(code="8601", algo="EntropyCalibration2"):
    return f"TRT-{code}-{algo}\ninput: 3c010a14\n/stem/Conv_output_0: 3d8a7b2e\n".encode()


def test_calibration_cache_header_rules():
    from calibration.calibrator import cache_usable, parse_cache_header, trt_version_codes

    assert parse_cache_header(_cache_bytes()) == (8601, "EntropyCalibration2")
    assert 8601 in trt_version_codes("8.6.1.6") and 100300 in trt_version_codes("10.3.0")
    assert cache_usable(_cache_bytes(), "8.6.1.6") == (True, "ok")
    ok, why = cache_usable(_cache_bytes("8502"), "8.6.1")
    assert not ok and "8502" in why
    ok, why = cache_usable(_cache_bytes(algo="MinMaxCalibration"), "8.6.1")
    assert not ok and "MinMaxCalibration" in why
    ok, why = cache_usable(b"\x00\x01binary junk", "8.6.1")
    assert not ok and "not a TensorRT calibration cache" in why


def test_cache_file_read_write_and_bundle_copy(tmp_path):
    from calibration.calibrator import CacheFile

    logs: list[str] = []
    shipped = tmp_path / "bundle" / "engines" / "calibration-trt8.6.1.cache"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(_cache_bytes())
    cache = CacheFile(tmp_path / "local.cache", "8.6.1", log=logs.append, read_from=shipped)
    assert cache.read() == _cache_bytes() and "using calibration cache" in logs[-1]
    stale = CacheFile(tmp_path / "local.cache", "8.5.2", log=logs.append, read_from=shipped)
    assert stale.read() is None and "ignoring calibration cache" in logs[-1]
    written = cache.write(_cache_bytes())
    assert written.read_bytes() == _cache_bytes() and not list(tmp_path.glob(".*.tmp"))
    assert CacheFile(written, "8.6.1", log=logs.append).read() == _cache_bytes()


# -- engine metadata and refusal -----------------------------------------------------------------
def _artifact(**kw):
    from runtime.bundle.manifest import Artifact

    base = dict(
        file="engines/model.fp16.engine",
        format="tensorrt",
        precision="fp16",
        tensorrt_version="10.3.0.30",
        gpu="Orin",
        compute_capability="8.7",
        batch=(1, 8),
        extra={"build": {"precision": "fp16", "batch": [1, 8], "opt_batch": 8, "int8_mode": None}},
    )
    base.update(kw)
    return Artifact(**base)


def test_engine_refusal_names_the_difference_and_the_rebuild_command():
    from runtime.engine.meta import EngineMismatchError, Platform, check_engine, engine_problems

    here = Platform("10.3.0.26", "Orin", "8.7")
    assert engine_problems(_artifact(), here) == []  # build number may differ
    other_trt = Platform("8.5.2.2", "Orin", "8.7")
    with pytest.raises(EngineMismatchError) as err:
        check_engine(_artifact(), other_trt, "/opt/defectscope/models/elpv/1.0.0", "trt-fp16")
    msg = str(err.value)
    assert "built with TensorRT 10.3.0.30, this device has TensorRT 8.5.2.2" in msg
    assert "defectscope build-engine /opt/defectscope/models/elpv/1.0.0 --precision fp16 --batch 1 8" in msg
    other_gpu = Platform("10.3.0.30", "NVIDIA H100 80GB HBM3", "9.0")
    (problem,) = engine_problems(_artifact(), other_gpu)
    assert "compute capability 8.7 (Orin), this GPU is 9.0 (NVIDIA H100 80GB HBM3)" in problem
    same_cc = Platform("10.3.0.30", "Orin NX", "8.7")
    assert engine_problems(_artifact(), same_cc) and not engine_problems(_artifact(), same_cc, strict_gpu=False)
    assert "does not record the TensorRT version" in engine_problems(_artifact(tensorrt_version=None), here)[0]
    compat = _artifact(extra={"version_compatible": True})
    assert engine_problems(compat, Platform("10.5.0", "Orin", "8.7")) == []
    assert engine_problems(compat, Platform("10.1.0", "Orin", "8.7"))  # older runtime: no
    int8 = _artifact(precision="int8", extra={"build": {"precision": "int8", "int8_mode": "implicit", "opt_batch": 4}})
    with pytest.raises(
        EngineMismatchError,
        match=r"--precision int8 --batch 1 8 --opt-batch 4 --int8-mode implicit "
        r"--key trt-int8-orin",
    ):
        check_engine(int8, other_trt, "b", "trt-int8-orin")


def test_engine_io_check():
    from runtime.engine.meta import check_engine_io

    ok_in, ok_out = [("input", [-1, 3, 32, 32])], [("logits", [-1, 2])]
    check_engine_io(ok_in, ok_out, "input", (3, 32, 32), ("logits",), 2, "e")
    with pytest.raises(ValueError, match=r"engine inputs \['x'\]"):
        check_engine_io([("x", [-1, 3, 32, 32])], ok_out, "input", (3, 32, 32), ("logits",), 2, "e")
    with pytest.raises(ValueError, match="engine input shape"):
        check_engine_io([("input", [-1, 3, 64, 64])], ok_out, "input", (3, 32, 32), ("logits",), 2, "e")
    with pytest.raises(ValueError, match=r"engine output shape \[-1, 3\], expected \(N, 2\)"):
        check_engine_io(ok_in, [("logits", [-1, 3])], "input", (3, 32, 32), ("logits",), 2, "e")


def test_engine_artifact_fields_round_trip_through_the_bundle(calibrated, tmp_path):
    """What build-engine writes (a stand-in engine file here) validates, checksums and reads back."""
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import Artifact
    from runtime.bundle.write import write_bundle
    from runtime.engine.build import artifact_fields
    from runtime.engine.meta import Platform, check_engine
    from runtime.engine.plan import engine_file_name, plan_build

    b = load_bundle(calibrated)
    plan = plan_build(b.manifest, "10.3.0.30", "fp16", batch=(1, 8))
    platform = Platform("10.3.0.30", "Orin", "8.7")
    fields = artifact_fields(plan, platform, 12.3, 2048)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a real engine: metadata only")
    name = engine_file_name("trt-fp16", "fp16")
    art = Artifact(
        file=name,
        format="tensorrt",
        precision="fp16",
        tensorrt_version=platform.tensorrt_version,
        gpu=platform.gpu,
        compute_capability=platform.compute_capability,
        batch=plan.batch,
        extra=fields,
    )
    files = {n: b.path / n for n in b.manifest.files} | {name: engine}
    out = write_bundle(
        tmp_path / "with-engine", b.manifest.replace(artifacts={**b.manifest.artifacts, "trt-fp16": art}), files
    )
    back = load_bundle(out.path).manifest.artifacts["trt-fp16"]
    assert back.batch == (1, 8) and back.gpu == "Orin" and back.compute_capability == "8.7"
    assert back.extra["build"]["builder_flags"] == ["FP16"] and back.extra["build"]["source_artifact"] == "fp32"
    check_engine(back, platform, str(out.path), "trt-fp16")  # same platform: accepted


def test_tensorrt8_calibration_batches_are_the_onnx_runtime_set(calibrated, tmp_path):
    """On a device the copied calibration images (or the saved tensor) give the exact same batches."""
    import shutil
    from pathlib import Path

    from calibration.calibset import CalibrationSet, images_in, save_tensor
    from calibration.engine_cli import _calibration_stream, build_parser, match_calibration_images
    from runtime.bundle.load import load_bundle
    from runtime.engine.plan import plan_build

    b = load_bundle(calibrated)
    calib = CalibrationSet.from_dict(json.loads((calibrated / "calibration.json").read_text()))
    reference = calib.tensor()
    device = tmp_path / "device-images"
    for item in calib.items:
        src = Path(item.path)
        (device / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, device / src.parent.name / src.name)
    for extra in sorted((Path(calib.items[0].path).parent).glob("*.png"))[:5]:
        shutil.copy(extra, device / f"extra-{extra.name}")
    plan = plan_build(b.manifest, "8.6.1", "int8", calib_batch=8)
    logs: list[str] = []

    def stream_for(data):
        args = build_parser().parse_args([str(calibrated), "--calibration-data", str(data)])
        return _calibration_stream(args, b, plan, logs.append)

    stream, info = stream_for(device)
    assert info["fingerprint"] == calib.fingerprint and info["images"] == len(calib)
    np.testing.assert_array_equal(stream.x, reference)
    assert stream.n_batches == 5 and stream.shape == (8, 3, 32, 32)

    npy = save_tensor(tmp_path / "calib.npy", reference, calib)
    stream, info = stream_for(npy)
    assert info["fingerprint"] == calib.fingerprint
    np.testing.assert_array_equal(np.asarray(stream.x), reference)

    victim = device / Path(calib.items[2].path).parent.name / Path(calib.items[2].path).name
    victim.write_bytes(victim.read_bytes() + b"\0")  # same name, other content
    assert match_calibration_images(calib, images_in(device)) is None
    stream, info = stream_for(device)
    assert "fingerprint" not in info and len(stream.x) == len(images_in(device))
    assert "does not hold calibration.json's images" in logs[-1]


def test_detection_bundles_plan_fixed_batch_float_engines_on_tensorrt_10(tmp_path):
    """Faster R-CNN graphs: TensorRT >= 10 (NMS + RoiAlign), fixed batch 1, no INT8 engine (box gate missing)."""
    from runtime.bundle.manifest import Manifest
    from runtime.engine.build import BuildError
    from runtime.engine.plan import plan_build

    m = Manifest.from_dict(
        {
            "schema_version": 1,
            "model": {"name": "det", "version": "1", "task": "detection", "architecture": "tiny_det", "created": "x"},
            "classes": ["ok", "crack"],
            "good_classes": ["ok"],
            "input": {
                "name": "input",
                "height": 64,
                "width": 64,
                "resize_size": 64,
                "mean": [0, 0, 0],
                "std": [1, 1, 1],
                "resize_policy": "letterbox",
                "pad_value": 0,
                "color_order": "RGB",
            },
            "output": {
                "kind": "detections",
                "names": ["boxes", "scores", "labels"],
                "box_format": "xyxy",
                "score_threshold": 0.5,
                "max_detections": 100,
            },
            "artifacts": {"fp32": {"file": "model.onnx", "format": "onnx", "precision": "fp32"}},
            "default_artifact": "fp32",
            "files": {"model.onnx": "0" * 64},
        },
        where="manifest.json",
    )
    plan = plan_build(m, "10.3.0", "fp16")  # the CLI's default batch 1..8 is narrowed, and it says so
    assert plan.profile() == ((1, 3, 64, 64),) * 3 and plan.builder_flags == ("FP16",)
    assert any("fixed batch of 1" in n for n in plan.notes)
    assert plan_build(m, "11.0.0", "fp32").network_flags == ("STRONGLY_TYPED",)
    with pytest.raises(BuildError, match="TensorRT 10 or later .* NonMaxSuppression and RoiAlign"):
        plan_build(m, "8.6.1", "fp16")
    with pytest.raises(BuildError, match="INT8 TensorRT engines of detectors"):
        plan_build(m, "10.3.0", "int8")
