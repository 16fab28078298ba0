"""deploy install / rollback / prune / status against a staging --root."""

from __future__ import annotations

import json
import os
import threading

import pytest

from runtime.bundle.load import load_bundle, read_manifest
from runtime.bundle.manifest import sha256_file
from tests.deploy.conftest import MODELS, current_version, deploy, run_deploy, tree, write_deploy_config, write_station


def test_install_archive_then_directory_switches_current(tmp_path, bundles):
    root = tmp_path / "root"
    r = deploy("install", bundles.archive("1.0.0"), "--root", root, "--json").json()
    assert (r["name"], r["version"], r["changed"], r["previous"]) == ("tiny", "1.0.0", True, None)
    link = root / MODELS / "tiny/current"
    # Relative link: the tree works the same under any root (and on the station itself).
    assert os.readlink(link) == "1.0.0"
    installed = load_bundle(link)  # full verification of what was installed
    assert installed.manifest.model.version == "1.0.0"
    src = bundles.dir("1.0.0")
    assert sha256_file(link / "model.onnx") == sha256_file(src / "model.onnx")

    r = deploy("install", bundles.dir("1.1.0"), "--root", root, "--json").json()
    assert (r["version"], r["previous"], r["changed"]) == ("1.1.0", "1.0.0", True)
    assert current_version(root) == "1.1.0"
    assert sorted(p.name for p in (root / MODELS / "tiny").iterdir() if not p.name.startswith(".")) == [
        "1.0.0",
        "1.1.0",
        "current",
    ]
    # Nothing left in staging.
    assert list((root / MODELS / ".staging").iterdir()) == []


def test_reinstall_of_the_active_version_changes_nothing(tmp_path, bundles):
    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    before = tree(root)
    r = deploy("install", bundles.archive("1.0.0"), "--root", root, "--json").json()
    assert r["changed"] is False
    assert [p for p in tree(root) if ".deploy-state" not in p] == [p for p in before if ".deploy-state" not in p]


def test_tampered_archive_is_refused_and_nothing_changes(tmp_path, bundles):
    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    before = tree(root)
    bad = bundles.tampered_archive("1.1.0", tmp_path / "tiny-1.1.0-bad.tar.gz")
    r = deploy("install", bad, "--root", root, check=1)
    assert "checksums" in r.stderr and "model.onnx" in r.stderr and "checksum mismatch" in r.stderr
    assert tree(root) == before
    assert current_version(root) == "1.0.0"


def test_not_a_bundle_is_refused(tmp_path):
    root = tmp_path / "root"
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    r = deploy("install", junk, "--root", root, check=1)
    assert str(junk) in r.stderr
    r = deploy("install", tmp_path / "missing", "--root", root, check=1)
    assert "no such bundle" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = deploy("install", empty, "--root", root, check=1)
    assert "manifest.json" in r.stderr
    assert not (root / MODELS / "tiny").exists()


def test_same_version_with_different_files_needs_force(tmp_path, bundles):
    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    rebuilt = bundles.archive("1.0.0", seed=7)
    r = deploy("install", rebuilt, "--root", root, check=1)
    assert "already installed with different files" in r.stderr
    assert sha256_file(root / MODELS / "tiny/1.0.0/model.onnx") == sha256_file(bundles.dir("1.0.0") / "model.onnx")
    deploy("install", rebuilt, "--root", root, "--force")
    assert sha256_file(root / MODELS / "tiny/1.0.0/model.onnx") == sha256_file(
        bundles.dir("1.0.0", seed=7) / "model.onnx"
    )
    load_bundle(root / MODELS / "tiny/current")


def test_damaged_installed_copy_is_replaced_by_a_verified_one(tmp_path, bundles):
    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    deploy("install", bundles.archive("1.1.0"), "--root", root)
    model = root / MODELS / "tiny/1.0.0/model.onnx"
    model.write_bytes(b"bit rot")
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    load_bundle(root / MODELS / "tiny/1.0.0")
    assert current_version(root) == "1.0.0"


def test_unsafe_model_name_is_refused(tmp_path):
    from runtime.bundle.write import write_bundle
    from tests.factories import make_tiny_onnx, tiny_manifest

    onnx = make_tiny_onnx(tmp_path / "src/model.onnx")
    bad = write_bundle(tmp_path / "bad", tiny_manifest(name="../../etc", version="1.0.0"), {"model.onnx": onnx})
    root = tmp_path / "root"
    r = deploy("install", bad.path, "--root", root, check=1)
    assert "model name '../../etc' cannot be installed" in r.stderr
    assert not (root / "etc").exists()


def test_rollback_walks_back_through_the_history_never_forward(tmp_path, bundles):
    root = tmp_path / "root"
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        deploy("install", bundles.archive(v), "--root", root, "--keep", "5")
    r = deploy("rollback", "--root", root, "--json").json()
    assert (r["version"], r["previous"]) == ("1.1.0", "1.2.0")
    # Issue 14 item 7: the old `cd -` behaviour flipped 1.1.0 -> 1.2.0 -> 1.1.0 here.
    r = deploy("rollback", "--root", root, "--json").json()
    assert (r["version"], r["previous"]) == ("1.0.0", "1.1.0")
    assert current_version(root) == "1.0.0"
    r = deploy("rollback", "--root", root, check=1)
    assert "never moves forward" in r.stderr and "--to" in r.stderr
    assert current_version(root) == "1.0.0"
    # An explicit target may go forward; plain rollbacks then walk back from there.
    deploy("rollback", "--root", root, "--to", "1.2.0")
    assert current_version(root) == "1.2.0"
    deploy("rollback", "--root", root)
    assert current_version(root) == "1.0.0"  # 1.1.0 was rolled back from: it left the history stack
    r = deploy("rollback", "--root", root, "--to", "9.9.9", check=1)
    assert "9.9.9 is not installed" in r.stderr
    assert current_version(root) == "1.0.0"
    history = json.loads((root / MODELS / "tiny/.deploy-state.json").read_text())["history"]
    assert [(h["version"], h["action"]) for h in history] == [
        ("1.0.0", "install"),
        ("1.1.0", "install"),
        ("1.2.0", "install"),
        ("1.1.0", "rollback"),
        ("1.0.0", "rollback"),
        ("1.2.0", "rollback-to"),
        ("1.0.0", "rollback"),
    ]


def test_a_new_install_after_rollbacks_is_the_top_of_the_history(tmp_path, bundles):
    root = tmp_path / "root"
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        deploy("install", bundles.archive(v), "--root", root, "--keep", "5")
    deploy("rollback", "--root", root)
    deploy("install", bundles.archive("1.3.0"), "--root", root, "--keep", "5")
    assert [deploy("rollback", "--root", root, "--json").json()["version"] for _ in range(2)] == ["1.1.0", "1.0.0"]


def test_rollback_from_is_idempotent(tmp_path, bundles):
    root = tmp_path / "root"
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        deploy("install", bundles.archive(v), "--root", root)
    r = deploy("rollback", "--root", root, "--from", "1.2.0", "--json").json()
    assert (r["version"], r["changed"]) == ("1.1.0", True)
    for _ in range(2):  # a re-run of the same rollback (the playbook's second pass) changes nothing
        r = deploy("rollback", "--root", root, "--from", "1.2.0", "--json").json()
        assert (r["version"], r["changed"]) == ("1.1.0", False)
    assert current_version(root) == "1.1.0"
    r = deploy("rollback", "--root", root, "--to", "1.0.0", "--json").json()
    assert r["changed"] is True
    assert deploy("rollback", "--root", root, "--to", "1.0.0", "--json").json()["changed"] is False


def test_rollback_with_nothing_to_go_back_to(tmp_path, bundles):
    root = tmp_path / "root"
    r = deploy("rollback", "--root", root, check=1)
    assert "no models installed" in r.stderr
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    r = deploy("rollback", "--root", root, check=1)
    assert "no older version" in r.stderr
    assert current_version(root) == "1.0.0"


def test_keep_prunes_the_least_recently_used_versions(tmp_path, bundles):
    root = tmp_path / "root"
    write_deploy_config(root, keep=1)
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        deploy("install", bundles.archive(v), "--root", root)

    def versions():
        return sorted(
            p.name
            for p in (root / MODELS / "tiny").iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
        )

    assert versions() == ["1.1.0", "1.2.0"]
    # Reactivating 1.1.0 makes 1.2.0 the least recently used one.
    deploy("rollback", "--root", root)
    r = deploy("install", bundles.archive("1.3.0"), "--root", root, "--keep", "1", "--json").json()
    assert r["pruned"] == ["1.2.0"]
    assert versions() == ["1.1.0", "1.3.0"]
    r = deploy("prune", "--root", root, "--keep", "0", "--json").json()
    assert r[0]["pruned"] == ["1.1.0"] and versions() == ["1.3.0"]
    load_bundle(root / MODELS / "tiny/current")


def test_prune_never_removes_a_version_a_station_pins(tmp_path, bundles):
    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    cfg = write_station(root, "line9", 9999)
    cfg.write_text(cfg.read_text().replace("tiny/current", "tiny/1.0.0"))
    for v in ("1.1.0", "1.2.0"):
        deploy("install", bundles.archive(v), "--root", root, "--keep", "0")
    assert (root / MODELS / "tiny/1.0.0").is_dir()
    assert not (root / MODELS / "tiny/1.1.0").exists()


def test_status_reports_versions_and_unreachable_daemons(tmp_path, bundles):
    root = tmp_path / "root"
    write_station(root, "line1", 1)  # nothing listens on port 1
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    deploy("install", bundles.archive("1.1.0"), "--root", root)
    s = deploy("status", "--root", root, "--json").json()
    model = s["models"]["tiny"]
    assert model["current"] == "1.1.0"
    assert [(v["version"], v["active"]) for v in model["versions"]] == [("1.1.0", True), ("1.0.0", False)]
    (station,) = s["stations"]
    assert station["name"] == "line1" and station["follows"] == "tiny"
    assert station["readyz"]["reachable"] is False and station["in_sync"] is False
    text = deploy("status", "--root", root).stdout
    assert "1.1.0" in text and "line1" in text and "unreachable" in text


def test_current_switch_is_atomic_for_readers(tmp_path, bundles):
    """A reader resolving current/manifest.json during many switches never finds it missing."""
    from deploy.store import ModelStore

    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    deploy("install", bundles.archive("1.1.0"), "--root", root)
    store = ModelStore(root / MODELS)
    manifest = store.current_link("tiny") / "manifest.json"
    errors: list[Exception] = []
    seen: set[str] = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(json.loads(manifest.read_text())["model"]["version"])
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            store.switch("tiny", ("1.0.0", "1.1.0")[i % 2])
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert seen == {"1.0.0", "1.1.0"}


def test_cli_subprocess_help_and_usage(tmp_path, bundles):
    out = run_deploy("--help").stdout
    for action in ("install", "rollback", "status", "prune", "install-units", "sign", "keygen"):
        assert action in out
    assert "--reload" in run_deploy("install", "--help").stdout
    run_deploy("install", check=2)  # missing bundle argument: usage error
    root = tmp_path / "root"
    run_deploy("install", bundles.archive("1.0.0"), "--root", root)
    assert read_manifest(root / MODELS / "tiny/current").model.version == "1.0.0"


def test_bad_deploy_config_names_the_key(tmp_path, bundles):
    root = tmp_path / "root"
    cfg = root / "etc/defectscope/deploy.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("[install]\nkeep = -1\n")
    r = deploy("install", bundles.archive("1.0.0"), "--root", root, check=1)
    assert "install.keep" in r.stderr and str(cfg) in r.stderr
    cfg.write_text("[service]\nreload_comand = 'x'\n")
    r = deploy("status", "--root", root, check=1)
    assert "service.reload_comand" in r.stderr


@pytest.mark.parametrize("keep", ["-1"])
def test_negative_keep_flag_is_refused(tmp_path, bundles, keep):
    r = deploy("install", bundles.archive("1.0.0"), "--root", tmp_path / "root", "--keep", keep, check=1)
    assert "--keep" in r.stderr


def test_leftovers_of_a_killed_install_are_cleaned(tmp_path, bundles):
    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    leftover = root / MODELS / ".staging/0123456789ab"
    leftover.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half copied")
    stale_link = root / MODELS / "tiny/.current.abcd1234"
    os.symlink("1.0.0", stale_link)
    deploy("install", bundles.archive("1.1.0"), "--root", root)
    assert not leftover.exists() and not stale_link.is_symlink()
    assert current_version(root) == "1.1.0"


def test_installed_files_are_readable_by_the_service_user_whatever_the_umask(tmp_path, bundles):
    root = tmp_path / "root"
    old = os.umask(0o077)
    try:
        deploy("install", bundles.archive("1.0.0"), "--root", root)
        deploy("install", bundles.dir("1.1.0"), "--root", root)
    finally:
        os.umask(old)
    for version in ("1.0.0", "1.1.0"):
        vdir = root / MODELS / "tiny" / version
        assert vdir.stat().st_mode & 0o777 == 0o755
        assert all(f.stat().st_mode & 0o777 == 0o644 for f in vdir.iterdir())


def test_example_deploy_config_documents_the_defaults():
    from deploy import PACKAGE_DIR
    from deploy.config import DeployConfig, load_deploy_config

    cfg = load_deploy_config(PACKAGE_DIR, PACKAGE_DIR / "deploy.example.toml")
    assert cfg.__dict__ | {"source": ""} == DeployConfig().__dict__ | {"source": ""}
