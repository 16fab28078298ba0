"""Issue 14 item 6: after a power cut the daemon starts on a version whose checksums pass."""

from __future__ import annotations

import os

from runtime.model_store import choose_bootable
from tests.deploy.conftest import MODELS, deploy


def _store(tmp_path, bundles, *versions):
    root = tmp_path / "root"
    for v in versions:
        deploy("install", bundles.archive(v), "--root", root, "--keep", "5")
    return root / MODELS / "tiny"


def test_a_verified_current_is_used_as_is(tmp_path, bundles):
    store = _store(tmp_path, bundles, "1.0.0", "1.1.0")
    choice = choose_bootable(store / "current")
    assert choice.path == store / "current" and choice.reason is None and not choice.fell_back


def test_a_current_with_a_torn_file_falls_back_to_the_previous_version(tmp_path, bundles):
    store = _store(tmp_path, bundles, "1.0.0", "1.1.0")
    # What an un-synced write looks like after a power cut: the file exists, its data does not.
    os.truncate(store / "1.1.0/model.onnx", 0)
    choice = choose_bootable(store / "current")
    assert choice.path == store / "1.0.0"
    assert "1.1.0 failed verification" in choice.reason and "checksum mismatch" in choice.reason


def test_fallback_walks_the_history_back_never_forward(tmp_path, bundles):
    store = _store(tmp_path, bundles, "1.0.0", "1.1.0", "1.2.0")
    deploy("rollback", "--root", tmp_path / "root")  # 1.2.0 -> 1.1.0; 1.2.0 is newer, not a fallback
    (store / "1.1.0/manifest.json").unlink()
    assert choose_bootable(store / "current").path == store / "1.0.0"


def test_nothing_verifies_returns_the_configured_path_with_the_reason(tmp_path, bundles):
    store = _store(tmp_path, bundles, "1.0.0", "1.1.0")
    for v in ("1.0.0", "1.1.0"):
        os.truncate(store / v / "model.onnx", 10)
    choice = choose_bootable(store / "current")
    assert choice.path == store / "current" and "no earlier version verifies" in choice.reason


def test_a_pinned_version_path_is_never_swapped(tmp_path, bundles):
    store = _store(tmp_path, bundles, "1.0.0", "1.1.0")
    os.truncate(store / "1.0.0/model.onnx", 0)
    choice = choose_bootable(store / "1.0.0")  # a station that names a version means that version
    assert choice.path == store / "1.0.0" and choice.reason is None


def test_installed_tree_is_complete_on_disk_before_current_switches(tmp_path, bundles):
    store = _store(tmp_path, bundles, "1.0.0")
    # Every file of the version was written through fsync'd descriptors and the staging tree
    # renamed whole: nothing partial (no temp names) is left beside the version.
    assert sorted(p.name for p in (store / "1.0.0").iterdir()) == ["manifest.json", "model.onnx"]
    assert [p.name for p in store.iterdir() if p.name.startswith(".") and p.name != ".deploy-state.json"] == []


def test_the_daemon_starts_on_the_fallback_and_says_so(tmp_path, bundles):
    from runtime.config import load_config
    from runtime.model import load_model

    store = _store(tmp_path, bundles, "1.0.0", "1.1.0")
    os.truncate(store / "1.1.0/model.onnx", 0)  # current's model torn by a power cut
    cfg_path = tmp_path / "station.toml"
    cfg_path.write_text(f'station = "st1"\n[model]\nbundle = "{store / "current"}"\nbackend = "onnxruntime-cpu"\n'
                        f'[[cameras]]\nid = "cam1"\nkind = "directory"\nsource = "{tmp_path}"\n')
    model = load_model(load_config(cfg_path))
    try:
        assert model.bundle.manifest.model.version == "1.0.0"
        assert model.boot_fallback and "1.1.0 failed verification" in model.boot_fallback
    finally:
        model.close()
    # A reload (generation > 1) never falls back silently: the torn current fails to load.
    import pytest

    from runtime.model import ModelLoadError

    with pytest.raises(ModelLoadError, match="checksum"):
        load_model(load_config(cfg_path), generation=2)
