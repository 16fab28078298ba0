"""Ed25519 bundle signatures: a station with trusted keys refuses unsigned or tampered bundles."""

from __future__ import annotations

import json
import shutil
import stat
import tarfile

import pytest

from runtime.bundle.archive import pack
from tests.deploy.conftest import MODELS, current_version, deploy, tree, write_deploy_config


@pytest.fixture
def keys(tmp_path):
    release = tmp_path / "keys/release.key"
    other = tmp_path / "keys/other.key"
    deploy("keygen", release)
    deploy("keygen", other)
    return release, other


def _trusting_station(root, public_key):
    """A station tree whose deploy.toml trusts ``public_key`` (copied to its /etc/defectscope/keys)."""
    dest = root / "etc/defectscope/keys" / public_key.name
    dest.parent.mkdir(parents=True)
    shutil.copy(public_key, dest)
    write_deploy_config(root, public_keys=[f"/etc/defectscope/keys/{public_key.name}"])
    return root


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path, keys):
    release, _ = keys
    assert stat.S_IMODE(release.stat().st_mode) == 0o600
    assert release.with_suffix(".pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    r = deploy("keygen", release, check=1)
    assert "refusing to overwrite" in r.stderr


def test_signed_archive_installs_and_records_the_key(tmp_path, bundles, keys):
    release, _ = keys
    archive = shutil.copy(bundles.archive("1.0.0"), tmp_path / "tiny-1.0.0.tar.gz")
    out = deploy("sign", archive, "--key", release).stdout
    assert "tiny 1.0.0" in out
    root = _trusting_station(tmp_path / "root", release.with_suffix(".pub"))
    r = deploy("install", archive, "--root", root, "--json").json()
    assert r["signed_by"].startswith("ed25519:")
    status = deploy("status", "--root", root, "--json", "--no-query").json()
    assert status["models"]["tiny"]["versions"][0]["signed_by"] == r["signed_by"]


def test_unsigned_bundle_is_refused_naming_the_check(tmp_path, bundles, keys):
    release, _ = keys
    root = _trusting_station(tmp_path / "root", release.with_suffix(".pub"))
    before = tree(root)
    r = deploy("install", bundles.archive("1.0.0"), "--root", root, check=1)
    assert "signature check 'missing' failed" in r.stderr
    # Only the store's own bookkeeping (lock file, empty staging dir) appeared.
    new = [p for p in tree(root) if p not in before]
    assert sorted(new) == sorted(["opt", "opt/defectscope", MODELS, f"{MODELS}/.deploy.lock", f"{MODELS}/.staging"])


def test_signature_by_an_untrusted_key_is_refused(tmp_path, bundles, keys):
    release, other = keys
    archive = shutil.copy(bundles.archive("1.0.0"), tmp_path / "tiny-1.0.0.tar.gz")
    deploy("sign", archive, "--key", other)
    root = _trusting_station(tmp_path / "root", release.with_suffix(".pub"))
    r = deploy("install", archive, "--root", root, check=1)
    assert "signature check 'key' failed" in r.stderr and "does not trust" in r.stderr
    assert current_version(root) is None


def test_manifest_changed_after_signing_is_refused(tmp_path, bundles, keys):
    """A consistent bundle (checksums fine) whose manifest differs from the signed one."""
    release, _ = keys
    bundle = shutil.copytree(bundles.dir("1.0.0"), tmp_path / "tiny-1.0.0")
    deploy("sign", bundle, "--key", release)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["good_classes"] = ["defect"]  # e.g. someone flips which class is "good"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    root = _trusting_station(tmp_path / "root", release.with_suffix(".pub"))
    r = deploy("install", bundle, "--root", root, check=1)
    assert "signature check 'signature' failed" in r.stderr and "modified after signing" in r.stderr
    assert current_version(root) is None


def test_model_file_changed_after_signing_fails_the_checksums(tmp_path, bundles, keys):
    release, _ = keys
    bundle = shutil.copytree(bundles.dir("1.0.0"), tmp_path / "tiny-1.0.0")
    deploy("sign", bundle, "--key", release)
    with open(bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    root = _trusting_station(tmp_path / "root", release.with_suffix(".pub"))
    r = deploy("install", bundle, "--root", root, check=1)
    assert "bundle verification (manifest, checksums, ONNX graph) failed" in r.stderr and "model.onnx" in r.stderr
    assert current_version(root) is None


def test_signature_of_a_directory_holds_for_its_packed_archive(tmp_path, bundles, keys):
    release, _ = keys
    bundle = shutil.copytree(bundles.dir("1.0.0"), tmp_path / "tiny-1.0.0")
    deploy("sign", bundle, "--key", release)
    archive = pack(bundle, tmp_path / "out/tiny-1.0.0.tar.gz")
    shutil.copy(tmp_path / "tiny-1.0.0.sig", tmp_path / "out/tiny-1.0.0.tar.gz.sig")
    root = _trusting_station(tmp_path / "root", release.with_suffix(".pub"))
    deploy("install", archive, "--root", root)
    assert current_version(root) == "1.0.0"
    # --public-key on the command line and `deploy verify` without installing.
    out = deploy("verify", archive, "--public-key", release.with_suffix(".pub")).stdout
    assert "checksums ok, signature ok" in out


def test_verify_reports_a_tampered_archive(tmp_path, bundles, keys):
    release, _ = keys
    bad = bundles.tampered_archive("1.1.0", tmp_path / "bad.tar.gz")
    with tarfile.open(bad) as tar:
        manifest = tar.extractfile("manifest.json").read()
    # Sign the (unchanged) manifest: the signature is fine, the model file is not.
    from deploy.signing import load_private_key, sign_manifest, write_signature

    write_signature(sign_manifest(manifest, load_private_key(release)), tmp_path / "bad.tar.gz.sig")
    r = deploy("verify", bad, "--public-key", release.with_suffix(".pub"), check=1)
    assert "checksum mismatch" in r.stderr
