"""Issue 14, install path: each test is an attack on `deploy install` (run as root) or a bad day.

Real files, tarfiles, FIFOs, a real tmpfs and the real CLI (in-process and as a subprocess).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.deploy.conftest import MODELS, current_version, deploy, run_deploy, tree, write_deploy_config


def _copy_dir(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _rewrite_manifest(bundle: Path, change) -> dict:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))
    return data


def _tar(dest: Path, members: dict[str, bytes | Path], extra=None) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for name, content in members.items():
            if isinstance(content, Path):
                tar.add(content, arcname=name, recursive=False)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, __import__("io").BytesIO(content))
        if extra:
            extra(tar)
    return dest


def _staging_empty(root: Path) -> bool:
    staging = root / MODELS / ".staging"
    return not staging.exists() or list(staging.iterdir()) == []


def _keys(tmp_path: Path, root: Path) -> Path:
    key = tmp_path / "keys/release.key"
    deploy("keygen", key)
    dest = root / "etc/defectscope/keys/release.pub"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(key.with_suffix(".pub"), dest)
    write_deploy_config(root, public_keys=["/etc/defectscope/keys/release.pub"])
    return key


# ---- item 1: paths from the manifest -------------------------------------------------------
@pytest.mark.parametrize("evil", ["../../../../{victim}", "sub/../../{victim}", "/{victim}", "./model.onnx"])
def test_manifest_path_traversal_in_a_directory_bundle_writes_nothing_outside(tmp_path, bundles, evil):
    victim = tmp_path / "victim.txt"
    payload = b"root-owned payload"
    bundle = _copy_dir(bundles.dir("1.0.0"), tmp_path / "evil-bundle")
    name = evil.format(victim=str(victim.relative_to("/")) if evil.startswith("/") else victim.name)
    target = (bundle / name) if not name.startswith("/") else Path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(payload) if not target.exists() else None
    _rewrite_manifest(bundle, lambda d: d["files"].update({name: hashlib.sha256(target.read_bytes()).hexdigest()}))
    root = tmp_path / "root"
    r = deploy("install", bundle, "--root", root, check=1)
    assert "not a safe bundle path" in r.stderr
    assert not (root / MODELS / "tiny").exists()
    escaped = [p for p in tmp_path.rglob("victim.txt") if root in p.parents]
    assert escaped == [] and _staging_empty(root)


def test_traversal_is_refused_before_the_signature_check_and_nothing_is_copied(tmp_path, bundles):
    # Today's hole: the copy happened before the (missing) signature was looked at.
    root = tmp_path / "root"
    _keys(tmp_path, root)
    bundle = _copy_dir(bundles.dir("1.0.0"), tmp_path / "evil-bundle")
    (tmp_path / "x").write_bytes(b"payload")
    _rewrite_manifest(bundle, lambda d: d["files"].update({"../x": hashlib.sha256(b"payload").hexdigest()}))
    before = tree(root)
    deploy("install", bundle, "--root", root, check=1)
    store_plumbing = {MODELS, "opt", "opt/defectscope", f"{MODELS}/.deploy.lock", f"{MODELS}/.staging"}
    assert set(tree(root)) - store_plumbing == set(before)
    assert not (root / MODELS / "x").exists() and not (root / MODELS / ".staging/x").exists()


def test_unsigned_bundle_is_refused_before_any_file_is_staged(tmp_path, bundles):
    # An unsigned archive whose model is also corrupt: if the signature were checked after extraction
    # (today), the checksum error would come first.
    root = tmp_path / "root"
    _keys(tmp_path, root)
    bad = bundles.tampered_archive("1.0.0", tmp_path / "tiny-1.0.0.tar.gz")
    r = deploy("install", bad, "--root", root, "--json", check=1)
    assert "signature check 'missing'" in r.json()["error"]
    assert _staging_empty(root)


def test_symlinked_file_in_a_directory_bundle_is_refused(tmp_path, bundles):
    bundle = _copy_dir(bundles.dir("1.0.0"), tmp_path / "evil-bundle")
    real = tmp_path / "elsewhere.onnx"
    shutil.move(bundle / "model.onnx", real)
    os.symlink(real, bundle / "model.onnx")  # same bytes, same sha256: only the type gives it away
    r = deploy("install", bundle, "--root", root := tmp_path / "root", check=1)
    assert "not a regular file" in r.stderr and "model.onnx" in r.stderr
    assert not (root / MODELS / "tiny").exists()


def test_fifo_in_a_directory_bundle_is_refused_without_blocking(tmp_path, bundles):
    bundle = _copy_dir(bundles.dir("1.0.0"), tmp_path / "evil-bundle")
    (bundle / "model.onnx").unlink()
    os.mkfifo(bundle / "model.onnx")
    # A subprocess with a timeout: a reader that opened the FIFO would hang here forever.
    proc = run_deploy("install", bundle, "--root", tmp_path / "root", "--json", check=1)
    assert "not a regular file" in json.loads(proc.stdout)["error"]


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "device"])
def test_archive_with_a_special_member_is_refused(tmp_path, bundles, kind):
    src = bundles.dir("1.0.0")

    def add(tar):
        info = tarfile.TarInfo("model.onnx")
        info.type = {
            "symlink": tarfile.SYMTYPE,
            "hardlink": tarfile.LNKTYPE,
            "fifo": tarfile.FIFOTYPE,
            "device": tarfile.CHRTYPE,
        }[kind]
        info.linkname = "/etc/shadow"
        tar.addfile(info)

    archive = _tar(tmp_path / "evil.tar.gz", {"manifest.json": src / "manifest.json"}, extra=add)
    r = deploy("install", archive, "--root", root := tmp_path / "root", check=1)
    assert "not a regular file" in r.stderr
    assert not (root / MODELS / "tiny").exists() and _staging_empty(root)


# ---- item 2: everything installed is covered by the signature --------------------------------
def test_signed_archive_with_an_unlisted_extra_member_is_refused(tmp_path, bundles):
    root = tmp_path / "root"
    key = _keys(tmp_path, root)
    src = bundles.dir("1.0.0")
    archive = _tar(
        tmp_path / "tiny-1.0.0.tar.gz",
        {
            "manifest.json": src / "manifest.json",
            "model.onnx": src / "model.onnx",
            "hooks/post-install.sh": b"#!/bin/sh\nrm -rf /\n",
        },
    )
    deploy("sign", archive, "--key", key)  # the signature over the manifest is valid
    r = deploy("install", archive, "--root", root, check=1)
    assert "does not list" in r.stderr and "hooks/post-install.sh" in r.stderr
    assert not (root / MODELS / "tiny").exists()


def test_stray_file_in_a_directory_bundle_is_refused(tmp_path, bundles):
    bundle = _copy_dir(bundles.dir("1.0.0"), tmp_path / "b")
    (bundle / "notes.txt").write_text("not listed")
    r = deploy("install", bundle, "--root", tmp_path / "root", check=1)
    assert "does not list" in r.stderr and "notes.txt" in r.stderr


def test_duplicate_archive_member_is_refused(tmp_path, bundles):
    # tar keeps both; an extractor would let the second (unchecked) copy win.
    src = bundles.dir("1.0.0")
    archive = _tar(
        tmp_path / "dup.tar.gz",
        {"manifest.json": src / "manifest.json", "model.onnx": src / "model.onnx"},
        extra=lambda tar: tar.addfile(_info("model.onnx", 4), __import__("io").BytesIO(b"evil")),
    )
    r = deploy("install", archive, "--root", tmp_path / "root", check=1)
    assert "appears twice" in r.stderr


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def test_forged_manifest_with_swapped_classes_fails_install_and_bundle_verify(tmp_path, bundles):
    root = tmp_path / "root"
    key = _keys(tmp_path, root)
    bundle = _copy_dir(bundles.dir("1.0.0"), tmp_path / "tiny-1.0.0")
    deploy("sign", bundle, "--key", key)
    # Swap the class names: "defect" would be judged "ok". Checksums of the model still pass.
    _rewrite_manifest(bundle, lambda d: d.update(classes=d["classes"][::-1], good_classes=[d["classes"][1]]))
    r = deploy("install", bundle, "--root", root, check=1)
    assert "signature check 'signature'" in r.stderr
    from runtime.bundle.cli import main as bundle_main

    assert bundle_main(["verify", str(bundle)]) == 1  # the .sig's recorded digest no longer matches
    assert bundle_main(["verify", str(bundle), "--public-key", str(key.with_suffix(".pub"))]) == 1
    good = _copy_dir(bundles.dir("1.0.0"), tmp_path / "good" / "tiny-1.0.0")
    deploy("sign", good, "--key", key)
    assert bundle_main(["verify", str(good), "--public-key", str(key.with_suffix(".pub"))]) == 0


# ---- item 5: limits before trust; a full disk ends in JSON -----------------------------------
def test_member_count_bomb_is_refused_before_extraction(tmp_path, bundles):
    src = bundles.dir("1.0.0")
    members = {"manifest.json": src / "manifest.json", "model.onnx": src / "model.onnx"}
    members.update({f"junk/{i:05d}": b"" for i in range(2000)})
    archive = _tar(tmp_path / "bomb.tar.gz", members)
    r = deploy("install", archive, "--root", root := tmp_path / "root", "--json", check=1)
    assert "members" in r.json()["error"] and _staging_empty(root)


def test_size_bomb_is_refused_before_anything_is_written(tmp_path, bundles):
    # 8 MiB of zeros compress to a few KiB; the declared sizes are checked before extraction.
    src = bundles.dir("1.0.0")
    bundle = _copy_dir(src, tmp_path / "big")
    (bundle / "pad.bin").write_bytes(bytes(8 << 20))
    _rewrite_manifest(bundle, lambda d: d["files"].update({"pad.bin": hashlib.sha256(bytes(8 << 20)).hexdigest()}))
    archive = _tar(tmp_path / "big.tar.gz", {n: bundle / n for n in ("manifest.json", "model.onnx", "pad.bin")})
    assert archive.stat().st_size < 256 << 10
    root = tmp_path / "root"
    write_deploy_config(root)
    (root / "etc/defectscope/deploy.toml").write_text("[install]\nmax_bundle_mib = 4\n")
    r = deploy("install", archive, "--root", root, "--json", check=1)
    assert "MiB of files, more than the limit of 4 MiB" in r.json()["error"] and _staging_empty(root)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "root" / MODELS
    mnt.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_ends_with_a_json_error_and_an_untouched_store(tmp_path, bundles, small_tmpfs):
    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    bundle = _copy_dir(bundles.dir("1.1.0"), tmp_path / "big")
    blob = os.urandom(12 << 20)  # incompressible: does not fit beside the margin on a 20 MiB tmpfs
    (bundle / "pad.bin").write_bytes(blob)
    _rewrite_manifest(bundle, lambda d: d["files"].update({"pad.bin": hashlib.sha256(blob).hexdigest()}))
    proc = run_deploy("install", bundle, "--root", root, "--json", check=1)
    err = json.loads(proc.stdout)  # Ansible parses stdout: one JSON object, no traceback
    assert "free" in err["error"] and err["exit_code"] == 1
    assert "Traceback" not in proc.stderr
    assert current_version(root) == "1.0.0" and _staging_empty(root)
    assert not (root / MODELS / "tiny/1.1.0").exists()


# ---- item 3: what root installs, root wrote --------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the ownership check only applies when deploy runs as root")


@needs_root
def test_archive_owned_by_the_daemon_user_is_refused(tmp_path, bundles):
    archive = tmp_path / "incoming/tiny-1.0.0.tar.gz"
    archive.parent.mkdir()
    shutil.copy(bundles.archive("1.0.0"), archive)
    os.chown(archive, 65534, 65534)
    r = deploy("install", archive, "--root", tmp_path / "root", check=1)
    assert "owned by uid 65534" in r.stderr


@needs_root
def test_a_pre_created_directory_named_like_the_archive_is_refused(tmp_path, bundles):
    # The daemon user pre-creates <name>.tar.gz/ as a directory bundle of its choosing.
    fake = _copy_dir(bundles.dir("1.0.0"), tmp_path / "incoming/tiny-1.0.0.tar.gz")
    for p in [fake, *fake.iterdir()]:
        os.chown(p, 65534, 65534)
    r = deploy("install", fake, "--root", root := tmp_path / "root", check=1)
    assert "not root" in r.stderr and not (root / MODELS / "tiny").exists()


@needs_root
def test_symlinked_archive_and_group_writable_file_are_refused(tmp_path, bundles):
    link = tmp_path / "link.tar.gz"
    os.symlink(bundles.archive("1.0.0"), link)
    assert "is a symlink" in deploy("install", link, "--root", tmp_path / "root", check=1).stderr
    writable = tmp_path / "w.tar.gz"
    shutil.copy(bundles.archive("1.0.0"), writable)
    os.chmod(writable, 0o664)
    assert "writable by group or others" in deploy("install", writable, "--root", tmp_path / "root", check=1).stderr


def test_staging_directory_is_private(tmp_path, bundles):
    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    staging = root / MODELS / ".staging"
    assert staging.stat().st_mode & 0o777 == 0o700


# ---- item 7: anti-rollback --------------------------------------------------------------------
def test_signed_downgrade_needs_allow_downgrade(tmp_path, bundles):
    root = tmp_path / "root"
    key = _keys(tmp_path, root)
    archives = {}
    for v in ("1.1.0", "1.2.0"):
        archives[v] = shutil.copy(bundles.archive(v), tmp_path / f"tiny-{v}.tar.gz")
        deploy("sign", archives[v], "--key", key)
    deploy("install", archives["1.2.0"], "--root", root)
    r = deploy("install", archives["1.1.0"], "--root", root, check=1)
    assert "older than 1.2.0" in r.stderr and "--allow-downgrade" in r.stderr
    assert current_version(root) == "1.2.0"
    deploy("install", archives["1.1.0"], "--root", root, "--allow-downgrade")
    assert current_version(root) == "1.1.0"
