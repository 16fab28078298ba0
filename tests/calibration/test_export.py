"""Export -> bundle -> load -> infer, parity enforcement, bundle refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")


def _test_paths(splits, n=None):
    paths = [s.path for s in splits.test]
    labels = [s.label for s in splits.test]
    return (paths[:n], labels[:n]) if n else (paths, labels)


def test_round_trip_export_bundle_load_infer(exported, run_dir, splits):
    from calibration.evaluate import ort_session
    from calibration.export import torch_logits
    from runtime.bundle.load import load_bundle
    from runtime.inference.preprocess import Preprocessor
    from training.checkpoint import load_model

    bundle = load_bundle(exported)  # schema + sha256 + ONNX graph I/O checks
    m = bundle.manifest
    model, card = load_model(run_dir)
    assert m.classes == tuple(card.classes) == ("defect", "ok")
    assert m.good_classes == ("ok",)
    assert m.input.to_dict() == card.input.to_dict()
    assert m.output.names == ("logits",) and m.default_artifact == "fp32"
    assert m.model.name == "tiny" and m.model.architecture == "tiny_cnn"

    graph = onnx.load(str(bundle.artifact_path("fp32")))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert graph.graph.input[0].name == "input" and graph.graph.output[0].name == "logits"
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis

    prov = m.provenance
    assert prov["config_hash"] == "cfg-test" and prov["dataset_fingerprint"] == splits.fingerprint
    assert "git_commit" in prov and {"torch", "onnx", "onnxruntime"} <= set(prov["libraries"])
    assert prov["export"]["opset"] == 17 and prov["export"]["parity"]["passed"] is True
    assert prov["training"]["weights_sha256"] and prov["training"]["data"]["path"]

    fp32 = m.metrics["fp32"]
    assert fp32["split"] == "test" and fp32["n"] == len(splits.test)
    assert fp32["accuracy"] > 0.9 and set(fp32["per_class_recall"]) == {"defect", "ok"}

    # The runtime's own path: read files, preprocess, run the bundle's ONNX at batch 1 and 5.
    paths, labels = _test_paths(splits, 10)
    x = Preprocessor(m.input).load_batch(paths)
    sess = ort_session(bundle.artifact_path(), threads=1)
    got = np.concatenate(
        [sess.run(None, {"input": x[:5]})[0], *[sess.run(None, {"input": x[i : i + 1]})[0] for i in range(5, 10)]]
    )
    ref = torch_logits(model, x)
    assert got.shape == (10, 2)
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert (got.argmax(1) == np.array(labels)).mean() >= 0.9


def test_parity_numbers_and_detected_mismatch(run_dir, splits, tmp_path):
    from calibration.export import check_parity, export_onnx
    from runtime.inference.preprocess import Preprocessor
    from training.checkpoint import load_model

    model, card = load_model(run_dir)
    spec = card.input
    path = tmp_path / "m.onnx"
    info = export_onnx(model, spec, path, 2)
    assert info.opset == 17 and info.nodes > 0
    x = Preprocessor(spec).load_batch(_test_paths(splits, 24)[0])
    report = check_parity(model, path, x, atol=1e-4, min_agreement=1.0, threads=1, batch_size=8)
    assert report.passed and report.n == 24 and report.batch_sizes == (1, 8)
    assert 0.0 <= report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0
    assert "parity ok" in report.summary()

    # A different network behind the same file name must be caught.
    with torch.no_grad():
        model.head[1].bias.add_(torch.tensor([3.0, -3.0]))
    bad = check_parity(model, path, x, atol=1e-3, min_agreement=0.99, threads=1)
    assert not bad.passed and bad.max_abs_diff > 1.0
    assert "FAILED" in bad.summary()


def test_export_cli_enforces_parity_tolerance(run_dir, tmp_path, capsys):
    from calibration.cli import EXIT_PARITY, export_main

    out = tmp_path / "b"
    # Float32 ORT vs torch differ by ~1e-7..1e-6: an absurd tolerance must fail the export.
    rc = export_main([str(run_dir), "--out", str(out), "--parity-atol", "1e-12", "--threads", "1", "--no-eval"])
    assert rc == EXIT_PARITY
    assert not out.exists()
    assert "parity FAILED" in capsys.readouterr().out


def test_export_cli_refuses_existing_out_and_packs(exported, run_dir, tmp_path, capsys):
    from calibration.cli import export_main
    from runtime.bundle.archive import unpack
    from runtime.bundle.load import load_bundle

    out = tmp_path / "b"
    out.mkdir()
    assert export_main([str(run_dir), "--out", str(out), "--threads", "1"]) == 1
    assert "already exists" in capsys.readouterr().out
    archive = tmp_path / "b.tar.gz"
    assert (
        export_main(
            [
                str(run_dir),
                "--out",
                str(out),
                "--force",
                "--no-eval",
                "--threads",
                "1",
                "--version",
                "2.1.0",
                "--pack",
                str(archive),
            ]
        )
        == 0
    )
    b = unpack(archive, tmp_path / "unpacked")
    assert b.manifest.model.version == "2.1.0" and "fp32" not in b.manifest.metrics
    assert load_bundle(tmp_path / "unpacked").manifest.files == b.manifest.files


def _edit_manifest(bundle, fn):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _rehash(bundle, name="model.onnx"):
    from runtime.bundle.manifest import sha256_file

    _edit_manifest(bundle, lambda d: d["files"].__setitem__(name, sha256_file(bundle / name)))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("corrupt_onnx", r"model\.onnx: not a loadable ONNX model"),
        ("wrong_checksum", r"model\.onnx: checksum mismatch"),
        ("missing_classes", r"key 'classes': missing"),
        ("input_name", r"input name 'input' does not match manifest input.name 'image'"),
        ("input_shape", r"input shape \['batch', 3, 32, 32\] does not match manifest input \(N,3,48,48\)"),
        ("class_count", r"output 'logits' has shape \['batch', 2\], expected \(N, 3\)"),
    ],
)
def test_bad_bundles_are_refused_with_their_own_message(bundle_copy, damage, message):
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import BundleError

    if damage == "corrupt_onnx":
        (bundle_copy / "model.onnx").write_bytes(b"\x08\x07garbage, not protobuf" * 10)
        _rehash(bundle_copy)
    elif damage == "wrong_checksum":
        data = bytearray((bundle_copy / "model.onnx").read_bytes())
        data[-1] ^= 0xFF
        (bundle_copy / "model.onnx").write_bytes(bytes(data))
    elif damage == "missing_classes":
        _edit_manifest(bundle_copy, lambda d: d.pop("classes"))
    elif damage == "input_name":
        _edit_manifest(bundle_copy, lambda d: d["input"].__setitem__("name", "image"))
    elif damage == "input_shape":
        _edit_manifest(bundle_copy, lambda d: d["input"].update(height=48, width=48, resize_size=48))
    elif damage == "class_count":
        _edit_manifest(bundle_copy, lambda d: d.__setitem__("classes", ["defect", "ok", "scratch"]))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_half_written_bundle_is_not_a_bundle(bundle_copy):
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import BundleError

    (bundle_copy / "manifest.json").unlink()  # the manifest is written last: no manifest, no bundle
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_bundle(bundle_copy)
    shutil.rmtree(bundle_copy)
