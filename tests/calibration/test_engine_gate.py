"""Issue 14 item 12: an INT8 engine built on the station must pass the bundle's accuracy budget.

TensorRT is not here, so ONNX Runtime stands in for the engine's outputs: a faithful copy of
the FP32 model passes, a model that flips verdicts is refused and the bundle stays as it was.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.bundle.load import load_bundle
from runtime.bundle.manifest import Artifact, BundleError
from runtime.engine.gate import (
    HOLDOUT_FILE,
    EngineRejectedError,
    budget_for,
    compare,
    gate_candidate,
    pack_holdout,
    read_holdout,
)
from tests.factories import make_tiny_bundle, make_tiny_onnx


def _flipped_onnx(path, scale=-1.0):
    """The tiny model with its weights scaled: scale -1 swaps every verdict (a broken INT8 engine)."""
    import onnx
    from onnx import numpy_helper

    src = make_tiny_onnx(path.parent / "src.onnx")
    model = onnx.load(src)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "W":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, "W"))
    onnx.save(model, path)
    return path


def _images(n=40, size=32, seed=1):
    rng = np.random.default_rng(seed)
    # Half dark, half bright: the tiny model's two classes.
    level = np.r_[rng.uniform(-1.8, -0.4, n // 2), rng.uniform(0.4, 1.8, n - n // 2)].astype(np.float32)
    return np.broadcast_to(level[:, None, None, None], (n, 3, size, size)).copy(), np.r_[
        np.zeros(n // 2), np.ones(n - n // 2)
    ]


@pytest.fixture
def bundle(tmp_path):
    make_tiny_bundle(tmp_path / "b")
    x, labels = _images()
    return pack_holdout(tmp_path / "b", x, labels, limit=32)


def _candidate(bundle, tmp_path, onnx_path, key="int8-standin"):
    """The manifest + files a build would write, with ORT-run ONNX standing in for the engine artifact."""
    files = {n: bundle.path / n for n in bundle.manifest.files}
    files[f"engines/{key}.onnx"] = onnx_path
    art = Artifact(file=f"engines/{key}.onnx", format="onnx", precision="int8")
    return bundle.manifest.replace(artifacts={**bundle.manifest.artifacts, key: art}), files, key


def _ort(b, key):
    from runtime.inference.backends import OrtBackend

    return OrtBackend(b, key, cuda=False, threads=1)


def test_holdout_is_packed_listed_and_checksummed(bundle):
    assert HOLDOUT_FILE in bundle.manifest.files and bundle.manifest.provenance["holdout"]["n"] == 32
    x, ref, labels = read_holdout(load_bundle(bundle.path))
    assert x.shape == (32, 3, 32, 32) and ref.shape == (32, 2) and labels.shape == (32,)
    backend = _ort(bundle, "fp32")
    np.testing.assert_allclose(backend.run(x)[0], ref, rtol=1e-5, atol=1e-5)  # references are the FP32 outputs
    with open(bundle.path / HOLDOUT_FILE, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bundle.path)


def test_compare_with_and_without_labels():
    ref = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
    cand = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    assert compare(ref, cand, None, 1.0).drop_points == pytest.approx(25.0)
    r = compare(ref, cand, np.array([0, 1, 0, 0]), 30.0)
    assert r.metric == "accuracy_drop" and r.drop_points == pytest.approx(25.0) and r.passed  # 3/4 -> 2/4
    # With labels, only lost accuracy counts: a candidate that disagrees but is right more often passes.
    assert compare(ref, cand, np.array([0, 0, 0, 1]), 0.0).drop_points == pytest.approx(-25.0)
    assert not compare(ref, cand, None, 24.9).passed and compare(ref, cand, None, 25.0).passed


def test_a_faithful_engine_passes_and_a_broken_one_is_refused(bundle, tmp_path):
    good = make_tiny_onnx(tmp_path / "good.onnx")
    manifest, files, key = _candidate(bundle, tmp_path, good)
    report = gate_candidate(manifest, files, key, _ort, tmp_path / "w1")
    assert report.passed and report.drop_points == 0.0 and report.n == 32

    before = json.loads((bundle.path / "manifest.json").read_text())
    bad = _flipped_onnx(tmp_path / "bad.onnx")
    manifest, files, key = _candidate(bundle, tmp_path, bad)
    with pytest.raises(EngineRejectedError, match="INT8 engine refused.*keeps serving the ONNX model"):
        gate_candidate(manifest, files, key, _ort, tmp_path / "w2")
    assert json.loads((bundle.path / "manifest.json").read_text()) == before  # the real bundle is untouched


def test_budget_comes_from_the_bundles_int8_gate(bundle, tmp_path):
    from runtime.bundle.write import update_manifest

    b = update_manifest(bundle.path, metrics={"int8": {"gate": {"budget_points": 0.25}}})
    assert budget_for(b) == 0.25
    assert budget_for(load_bundle(make_tiny_bundle(tmp_path / "plain").path)) == 1.0


def test_without_a_sample_an_int8_engine_is_refused(tmp_path):
    plain = make_tiny_bundle(tmp_path / "plain")
    manifest, files, key = _candidate(plain, tmp_path, make_tiny_onnx(tmp_path / "e.onnx"))
    with pytest.raises(EngineRejectedError, match="no held-out sample"):
        gate_candidate(manifest, files, key, _ort, tmp_path / "w")


def test_a_pickled_sample_is_refused(bundle, tmp_path):
    """np.load on a bundle file never unpickles (an object array would run code)."""
    from runtime.bundle.write import write_bundle

    evil = tmp_path / "evil.npz"
    np.savez(evil, x=np.array([object()], dtype=object), reference=np.zeros((1, 2), np.float32))
    files = {n: bundle.path / n for n in bundle.manifest.files}
    files[HOLDOUT_FILE] = evil
    b = write_bundle(tmp_path / "evil-bundle", bundle.manifest, files, check_graph=False)
    with pytest.raises(BundleError, match="not a readable holdout sample"):
        read_holdout(b)


def test_bundle_holdout_cli(tmp_path):
    from runtime.bundle.cli import main

    make_tiny_bundle(tmp_path / "b")
    x, labels = _images(10)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", labels.astype(np.int64))
    assert (
        main(["holdout", str(tmp_path / "b"), "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")])
        == 0
    )
    assert read_holdout(load_bundle(tmp_path / "b"))[2].shape == (10,)


def test_without_a_packed_sample_calibration_images_and_fp32_outputs_are_the_reference(tmp_path):
    plain = make_tiny_bundle(tmp_path / "plain")
    calib_x, _ = _images(24, seed=3)
    manifest, files, key = _candidate(plain, tmp_path, make_tiny_onnx(tmp_path / "e.onnx"))
    report = gate_candidate(manifest, files, key, _ort, tmp_path / "w1", fallback_x=calib_x)
    assert report.passed and report.metric == "top1_disagreement" and report.n == 24
    manifest, files, key = _candidate(plain, tmp_path, _flipped_onnx(tmp_path / "bad.onnx"))
    with pytest.raises(EngineRejectedError, match="top1_disagreement 100.00 points"):
        gate_candidate(manifest, files, key, _ort, tmp_path / "w2", fallback_x=calib_x)
