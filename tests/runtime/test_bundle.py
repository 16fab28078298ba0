"""The bundle contract: valid bundles round-trip, bad ones are refused with their own message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle.archive import pack, unpack
from runtime.bundle.load import load_bundle, read_manifest
from runtime.bundle.manifest import MANIFEST, Artifact, BundleError
from runtime.bundle.write import add_artifact, update_manifest, write_bundle
from runtime.inference.preprocess import Preprocessor
from tests.factories import make_tiny_bundle, make_tiny_onnx, tiny_manifest


@pytest.fixture
def bundle(tmp_path):
    return make_tiny_bundle(tmp_path / "bundle")


def _edit_manifest(path: Path, fn) -> None:
    data = json.loads((path / MANIFEST).read_text())
    fn(data)
    (path / MANIFEST).write_text(json.dumps(data))


def test_round_trip_and_inference(bundle, tmp_path):
    import onnxruntime as ort

    loaded = load_bundle(bundle.path)
    assert loaded.manifest == bundle.manifest
    assert set(loaded.manifest.files) == {"model.onnx"}
    sess = ort.InferenceSession(str(loaded.artifact_path()), providers=["CPUExecutionProvider"])
    pre = Preprocessor(loaded.manifest.input)
    dark = np.full((40, 40), 10, np.uint8)
    bright = np.full((40, 40), 240, np.uint8)
    logits = sess.run(None, {loaded.manifest.input.name: pre.batch([dark, bright])})[0]
    assert logits.shape == (2, len(loaded.manifest.classes))
    assert logits[0].argmax() == 0 and logits[1].argmax() == 1


def test_pack_unpack_round_trip(bundle, tmp_path):
    archive = pack(bundle.path, tmp_path / "out" / "tiny.tar.gz")
    restored = unpack(archive, tmp_path / "restored")
    assert restored.manifest == bundle.manifest
    assert (restored.path / "model.onnx").read_bytes() == (bundle.path / "model.onnx").read_bytes()


def test_wrong_checksum_refused(bundle):
    with open(bundle.path / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx: checksum mismatch"):
        load_bundle(bundle.path)


def test_corrupt_onnx_refused_even_with_matching_checksum(tmp_path):
    bad = tmp_path / "src" / "model.onnx"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        write_bundle(tmp_path / "b", tiny_manifest(), {"model.onnx": bad})
    assert not (tmp_path / "b").exists(), "a refused bundle must not be left behind"


def test_missing_class_list_refused(bundle):
    _edit_manifest(bundle.path, lambda d: d.pop("classes"))
    with pytest.raises(BundleError, match="key 'classes': missing"):
        load_bundle(bundle.path)


def test_class_count_mismatch_refused(bundle):
    _edit_manifest(bundle.path, lambda d: d.update(classes=["a", "b", "c"], good_classes=["a"]))
    with pytest.raises(BundleError, match=r"expected \(N, 3\)"):
        load_bundle(bundle.path)


def test_input_name_mismatch_refused(tmp_path):
    src = make_tiny_onnx(tmp_path / "src" / "model.onnx", input_name="images")
    with pytest.raises(BundleError, match="input name 'images' does not match manifest input.name 'input'"):
        write_bundle(tmp_path / "b", tiny_manifest(), {"model.onnx": src})


def test_input_shape_mismatch_refused(tmp_path):
    src = make_tiny_onnx(tmp_path / "src" / "model.onnx", size=48)
    with pytest.raises(BundleError, match=r"input shape .* does not match manifest input \(N,3,32,32\)"):
        write_bundle(tmp_path / "b", tiny_manifest(size=32), {"model.onnx": src})


def test_schema_errors_name_the_key(bundle):
    _edit_manifest(bundle.path, lambda d: d["input"].update(std=[0.2, 0.0, 0.2]))
    with pytest.raises(BundleError, match=r"input\.std: every value must be > 0"):
        read_manifest(bundle.path)
    _edit_manifest(bundle.path, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleError, match="key 'schema_version'"):
        read_manifest(bundle.path)


def test_missing_manifest_means_not_a_bundle(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_bundle(tmp_path / "half")


def test_add_artifact_and_update_keep_bundle_valid(bundle, tmp_path):
    other = make_tiny_onnx(tmp_path / "other.onnx", seed=1)
    updated = add_artifact(
        bundle.path,
        "int8",
        Artifact("model.int8.onnx", "onnx", "int8"),
        other,
        metrics={"accuracy": 0.75},
        make_default=True,
    )
    assert updated.manifest.default_artifact == "int8"
    assert updated.manifest.metrics["int8"]["accuracy"] == 0.75
    assert set(load_bundle(bundle.path).manifest.files) == {"model.onnx", "model.int8.onnx"}
    update_manifest(bundle.path, default_artifact="fp32")
    assert load_bundle(bundle.path).manifest.default_artifact == "fp32"


def test_failed_rewrite_leaves_previous_bundle_intact(bundle, tmp_path):
    before = (bundle.path / MANIFEST).read_text()
    with pytest.raises(BundleError):
        add_artifact(bundle.path, "int8", Artifact("model.int8.onnx", "onnx", "int8"), tmp_path / "nope.onnx")
    assert (bundle.path / MANIFEST).read_text() == before
    load_bundle(bundle.path)
    assert not [p for p in bundle.path.parent.iterdir() if ".tmp-" in p.name]


def test_unsafe_archive_refused(tmp_path):
    import tarfile

    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../escape.txt")
    with pytest.raises(BundleError, match="unsafe archive member|not a regular file"):
        unpack(evil, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_bundle_cli_verify_and_inspect(bundle):
    ok = subprocess.run(
        [sys.executable, "-m", "defectscope", "bundle", "verify", str(bundle.path)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "defectscope", "bundle", "inspect", str(bundle.path)], capture_output=True, text=True
    )
    assert "tiny 1.0.0" in shown.stdout and "fp32" in shown.stdout
    with open(bundle.path / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    bad = subprocess.run(
        [sys.executable, "-m", "defectscope", "bundle", "verify", str(bundle.path)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "/etc/passwd", "./model.onnx", "a//b", "a\\..\\b", "manifest.json", "", "x\x00y"]
)
def test_unsafe_paths_in_the_manifest_are_refused_by_the_schema(bundle, name):
    _edit_manifest(bundle.path, lambda d: d["files"].update({name: "0" * 64}))
    with pytest.raises(BundleError, match="not a safe bundle path"):
        read_manifest(bundle.path)


def test_unsafe_artifact_and_cache_paths_are_refused(bundle):
    _edit_manifest(bundle.path, lambda d: d["artifacts"]["fp32"].update(file="../../model.onnx"))
    with pytest.raises(BundleError, match="artifacts.fp32.file.*not a safe bundle path"):
        read_manifest(bundle.path)
    _edit_manifest(bundle.path, lambda d: d["artifacts"]["fp32"].update(file="model.onnx", calibration_cache="/tmp/c"))
    with pytest.raises(BundleError, match="calibration_cache.*not a safe bundle path"):
        read_manifest(bundle.path)


def test_load_refuses_unlisted_files_and_symlinks(bundle, tmp_path):
    (bundle.path / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="does not list.*extra.bin"):
        load_bundle(bundle.path)
    load_bundle(bundle.path, strict=False)  # the daemon-side escape hatch still checks every listed file
    (bundle.path / "extra.bin").unlink()
    real = tmp_path / "real.onnx"
    (bundle.path / "model.onnx").rename(real)
    (bundle.path / "model.onnx").symlink_to(real)
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(bundle.path)


def test_pack_puts_the_manifest_first(bundle, tmp_path):
    import tarfile

    with tarfile.open(pack(bundle.path, tmp_path / "b.tar.gz")) as tar:
        assert tar.getnames()[0] == MANIFEST  # a station checks its signature before reading further
