"""Issue 14 item 6: after a power cut the daemon starts on a version whose checksums pass.

Issue 25 item 13: a kill at any step of a reinstall, rollback, prune or engine write leaves a complete `current`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runtime.bundle.store import choose_bootable
from tests.deploy.conftest import MODELS, REPO, current_version, deploy


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
    from runtime.config.station import load_config
    from runtime.inference.model import load_model

    store = _store(tmp_path, bundles, "1.0.0", "1.1.0")
    os.truncate(store / "1.1.0/model.onnx", 0)  # current's model torn by a power cut
    cfg_path = tmp_path / "station.toml"
    cfg_path.write_text(
        f'station = "st1"\n[model]\nbundle = "{store / "current"}"\nbackend = "onnxruntime-cpu"\n'
        f'[[cameras]]\nid = "cam1"\nkind = "directory"\nsource = "{tmp_path}"\n'
    )
    model = load_model(load_config(cfg_path))
    try:
        assert model.bundle.manifest.model.version == "1.0.0"
        assert model.boot_fallback and "1.1.0 failed verification" in model.boot_fallback
    finally:
        model.close()
    # A reload (generation > 1) never falls back silently: the torn current fails to load.
    import pytest

    from runtime.inference.model import ModelLoadError

    with pytest.raises(ModelLoadError, match="checksum"):
        load_model(load_config(cfg_path), generation=2)


# ---- issue 25 item 13: a kill at any step of a reinstall, rollback, prune or engine write --------
def _killed_at_every_step(scenario: str, template: Path, tmp_path: Path, allowed: set[str], **extra) -> dict:
    """Run tests/deploy/crashpoints.py: the operation killed before each of its durable steps in turn."""
    work = tmp_path / "crash"
    work.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.deploy.crashpoints",
            scenario,
            str(template),
            str(work),
            json.dumps({"allowed": ",".join(sorted(allowed)), **{k: str(v) for k, v in extra.items()}}),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["completed_at"] and report["exit_code"] == 0, report.get("final")
    for kill in report["kills"] + [{"step": "completed", **report["final"]}]:
        # What a station finds after the kill, and after the next `deploy prune`: a complete model.
        assert kill["after_kill"] in allowed and kill["after_prune"] in allowed, kill
        assert kill["prune_rc"] == 0 and kill["broken_versions"] == [], kill
    return report


def _template(tmp_path: Path, bundles, *steps: tuple) -> Path:
    root = tmp_path / "template"
    for archive, *flags in steps:
        deploy("install", archive, "--root", root, "--keep", "5", *flags)
    return root


def test_a_kill_at_any_step_of_reinstalling_the_active_version_keeps_a_complete_current(tmp_path, bundles):
    # The report: killed at the second rename, `current` dangled and the next prune deleted both copies.
    template = _template(tmp_path, bundles, (bundles.archive("1.0.0"),), (bundles.archive("1.1.0"),))
    report = _killed_at_every_step("reinstall", template, tmp_path, {"1.1.0"}, archive=bundles.archive("1.1.0", seed=1))
    assert len(report["kills"]) >= 20  # every rename/symlink/fsync/unlink of the install was a kill point


def test_a_kill_at_any_step_of_replacing_an_already_replaced_version_keeps_a_complete_current(tmp_path, bundles):
    template = _template(
        tmp_path,
        bundles,
        (bundles.archive("1.0.0"),),
        (bundles.archive("1.1.0"),),
        (bundles.archive("1.1.0", seed=1), "--force"),
    )
    assert (template / MODELS / "tiny/1.1.0").is_symlink()  # the replaced version: a link to its new tree
    _killed_at_every_step("reinstall-again", template, tmp_path, {"1.1.0"}, archive=bundles.archive("1.1.0"))


def test_a_kill_at_any_step_of_a_rollback_keeps_a_complete_current(tmp_path, bundles):
    template = _template(tmp_path, bundles, (bundles.archive("1.0.0"),), (bundles.archive("1.1.0"),))
    _killed_at_every_step("rollback", template, tmp_path, {"1.0.0", "1.1.0"})


def test_a_kill_at_any_step_of_a_prune_keeps_the_active_version(tmp_path, bundles):
    template = _template(
        tmp_path,
        bundles,
        (bundles.archive("1.0.0"),),
        (bundles.archive("1.1.0"),),
        (bundles.archive("1.1.0", seed=1), "--force"),
        (bundles.archive("1.2.0"),),
    )
    report = _killed_at_every_step("prune", template, tmp_path, {"1.2.0"})
    assert report["kills"], "prune --keep 0 of a plain and a replaced version has steps to kill"


def test_a_kill_at_any_step_of_writing_an_engine_into_the_active_version_keeps_a_complete_current(tmp_path, bundles):
    from runtime.bundle.load import load_bundle
    from runtime.bundle.write import write_bundle

    template = _template(tmp_path, bundles, (bundles.archive("1.0.0"),), (bundles.archive("1.1.0"),))
    active = load_bundle(template / MODELS / "tiny/current")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine")
    # What `defectscope build-engine --out` leaves for deploy to adopt: the version's files plus the engine.
    files = {n: active.path / n for n in active.manifest.files} | {"engines/model.engine": engine}
    write_bundle(template / MODELS / ".builds/b1/bundle", active.manifest, files, check_graph=False)
    report = _killed_at_every_step("engine", template, tmp_path, {"1.1.0"}, version="1.1.0")
    assert report["kills"]
    final = tmp_path / "crash" / f"n{report['completed_at']}" / MODELS / "tiny/current/engines/model.engine"
    assert final.read_bytes() == b"serialized engine"


def test_recover_restores_the_tree_the_old_code_left_renamed_aside(tmp_path, bundles):
    # A station killed under the landed code: `current` dangling, the active tree in .trash-<v>-<id>.
    root = _template(tmp_path, bundles, (bundles.archive("1.0.0"),), (bundles.archive("1.1.0"),))
    mdir = root / MODELS / "tiny"
    os.rename(mdir / "1.1.0", mdir / ".trash-1.1.0-0123abcd")
    r = deploy("prune", "--root", root, "--json").json()
    assert any("restored 1.1.0" in w for w in r[0]["warnings"])
    assert current_version(root) == "1.1.0" and choose_bootable(mdir / "current").reason is None
