"""uint8-input artifacts on the station: the manifest's ``artifacts.<key>.input`` (old bundles keep the
float path), the graph check refusing a mismatched artifact, TTA views in uint8 equal to the float
views, and the daemon serving a uint8-input artifact with the same verdicts as the float one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle.load import load_bundle
from runtime.bundle.manifest import BundleError, Manifest
from runtime.bundle.write import write_bundle
from runtime.config.station import ModelConfig, load_config
from runtime.inference.preprocess import InputSpec, Preprocessor
from runtime.inference.selection import create_backend
from runtime.inference.tta import TTA, expand_views
from runtime.serving.daemon import Daemon

from ._helpers import SIZE, Subscriber, make_images, manifest_dict, station_config, tiny_onnx

HAVE_OV = importlib.util.find_spec("openvino") is not None
PATTERN = ["ok", "defect", "uncertain", "ok", "defect"]


def _u8_bundle(tmp_path: Path, declare: str = "uint8_nhwc", wrap: bool = True) -> Path:
    from calibration.graph_input import write_uint8_artifact

    src = tiny_onnx(tmp_path / "src" / "model.onnx")
    data = manifest_dict()
    spec = InputSpec.from_dict(data["input"])
    u8 = tmp_path / "src" / "model.u8.onnx"
    if wrap:
        write_uint8_artifact(src, u8, spec)
    else:
        u8.write_bytes(src.read_bytes())
    data["artifacts"]["fp32-u8"] = {"file": "model.u8.onnx", "format": "onnx", "precision": "fp32", "input": declare}
    dest = tmp_path / "bundle"
    write_bundle(dest, Manifest.from_dict(data), {"model.onnx": src, "model.u8.onnx": u8})
    return dest


def test_manifest_input_kind_round_trips_and_old_bundles_default_to_float(tmp_path: Path) -> None:
    b = load_bundle(_u8_bundle(tmp_path))
    assert b.artifact("fp32-u8").input == "uint8_nhwc" and b.artifact("fp32").input == "float32_nchw"
    data = b.manifest.to_dict()
    assert data["artifacts"]["fp32-u8"]["input"] == "uint8_nhwc" and "input" not in data["artifacts"]["fp32"]
    bad = manifest_dict()
    bad["artifacts"]["fp32"]["input"] = "float16_nhwc"
    with pytest.raises(BundleError, match=r"'artifacts\.fp32\.input': expected one of"):
        Manifest.from_dict(bad)


def test_an_artifact_whose_graph_does_not_take_its_declared_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not match the artifact's input uint8_nhwc"):
        _u8_bundle(tmp_path, wrap=False)  # a float graph declared uint8
    with pytest.raises(BundleError, match=r"does not match manifest input \(N,3,32,32\)"):
        _u8_bundle(tmp_path / "2", declare="float32_nchw")  # a uint8 graph declared float


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "openvino"])
def test_backends_run_the_uint8_artifact_like_the_float_one(tmp_path: Path, backend: str) -> None:
    if backend == "openvino" and not HAVE_OV:
        pytest.skip("openvino is not installed (extra 'openvino'; make test installs it)")
    b = load_bundle(_u8_bundle(tmp_path))
    fl = create_backend(b, ModelConfig(bundle=b.path, backend=backend, artifact="fp32"))
    u8 = create_backend(b, ModelConfig(bundle=b.path, backend=backend, artifact="fp32-u8"))
    assert u8.input_kind == "uint8_nhwc" and u8.describe()["input"] == "uint8_nhwc"
    pre = Preprocessor(b.manifest.input)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8) for i in range(5)]
    (ref,) = fl.run(pre.batch(frames))
    (got,) = u8.run(np.stack([pre.frame_uint8(f) for f in frames]))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    u8.warmup((SIZE, SIZE, 3), 1, 4)  # zeros of the artifact's own dtype and layout
    fl.close()
    u8.close()


def test_tta_views_in_uint8_are_the_float_views() -> None:
    spec = InputSpec(height=SIZE, width=SIZE, resize_size=40, mean=(0.2, 0.4, 0.6), std=(0.3, 0.2, 0.25))
    pre = Preprocessor(spec)
    tta = TTA(expand_views("all"), pre)
    frame = np.random.default_rng(3).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    views_f = tta.expand(frame)
    views_u = tta.expand(frame, uint8=True)
    assert views_u.dtype == np.uint8 and views_u.shape == (tta.n_views, SIZE, SIZE, 3)
    scale, offset = pre.folded()
    # What the graph does: BGR -> RGB, NHWC -> NCHW, x * scale + offset.
    normalised = (
        views_u[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) * scale[:, None, None] + offset[:, None, None]
    )
    np.testing.assert_allclose(normalised, views_f, atol=1e-6)


def test_daemon_serves_a_uint8_artifact_with_the_float_verdicts(tmp_path: Path) -> None:
    bundle = _u8_bundle(tmp_path)
    verdicts = PATTERN * 2
    make_images(tmp_path / "replay", verdicts)
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay")}],
        model={"artifact": "fp32-u8"},
        publisher={"wait_for_subscribers": 1, "wait_timeout_s": 10.0},
    )
    sub = Subscriber(endpoint)
    d = Daemon(load_config(config), config_path=config)
    try:
        d.start()
        assert d.run() == 0
        sub.until(lambda s: any(m["state"] == "stopped" for m in s.statuses()), 10, what="final status")
        msgs = sub.verdicts()
        assert [m["verdict"] for m in msgs] == verdicts
        assert {m["model"]["artifact"] for m in msgs} == {"fp32-u8"}
    finally:
        d.shutdown()
        sub.close()
