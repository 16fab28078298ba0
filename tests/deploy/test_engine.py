"""`deploy build-engine`: what defectscope-engine@<station>.service runs (TensorRT itself is not here)."""

from __future__ import annotations

import pytest

from deploy import engine
from deploy.config import DeployConfig, DeployError
from runtime.bundle.manifest import Artifact
from runtime.bundle.write import add_artifact
from runtime.engine.meta import EngineUnavailableError, Platform
from tests.deploy.conftest import MODELS, deploy, write_station

ORIN = Platform("10.3.0.30", "Orin", "8.7")


def _on(platform):
    return lambda: platform


@pytest.fixture
def station(tmp_path, bundles):
    root = tmp_path / "root"
    deploy("install", bundles.archive("1.0.0"), "--root", root)
    return root, write_station(root, "line1", 9108)


def test_without_tensorrt_the_build_fails_with_the_reason(station):
    root, _ = station
    try:
        engine.current_platform()
        pytest.skip("TensorRT and a GPU are present here")
    except EngineUnavailableError:
        pass
    r = deploy("build-engine", "--station-config", "/etc/defectscope/line1.toml", "--root", root, check=1)
    assert "TensorRT is not importable" in r.stderr and "keeps serving ONNX" in r.stderr


def test_an_engine_for_this_tensorrt_is_not_rebuilt(station, monkeypatch, tmp_path):
    root, cfg_path = station
    fake_engine = tmp_path / "model.fp16.engine"
    fake_engine.write_bytes(b"engine bytes")
    add_artifact(
        root / MODELS / "tiny/current",
        "trt-fp16",
        Artifact(
            file="engines/model.fp16.engine",
            format="tensorrt",
            precision="fp16",
            tensorrt_version="10.3.0",
            gpu="Orin",
            compute_capability="8.7",
            batch=(1, 8),
        ),
        fake_engine,
    )
    # The platform probe needs a GPU; the decision is the runtime's own engine_problems().
    monkeypatch.setattr(engine, "current_platform", _on(ORIN))
    result = engine.build_for_station(root, DeployConfig(), cfg_path)
    assert not result.built and "already has engine 'trt-fp16' for TensorRT 10.3.0.30 on Orin" in result.reason
    # Another TensorRT version on the device: the engine must be rebuilt (build_args: a dry run).
    monkeypatch.setattr(engine, "current_platform", _on(Platform("10.4.0", "Orin", "8.7")))
    result = engine.build_for_station(root, DeployConfig(), cfg_path, build_args="--dry-run --tensorrt-version 10.4.0")
    assert result.built and "built with TensorRT 10.3.0" in result.reason


@pytest.mark.parametrize(
    "platform, why",
    [
        (Platform("10.3.0.30", "NVIDIA A2", "8.6"), "compute capability 8.7"),  # same TensorRT, another GPU
        (Platform("10.3.0.30", "Orin Nano", "8.7"), "built on GPU 'Orin'"),  # same sm, another GPU model
    ],
)
def test_an_engine_for_another_gpu_is_rebuilt_like_the_runtime_would_refuse_it(
    station, monkeypatch, tmp_path, platform, why
):
    """Issue 14 item 11: before, only the TensorRT version was compared, so these engines were kept."""
    root, cfg_path = station
    fake_engine = tmp_path / "model.fp16.engine"
    fake_engine.write_bytes(b"engine bytes")
    add_artifact(
        root / MODELS / "tiny/current",
        "trt-fp16",
        Artifact(
            file="engines/model.fp16.engine",
            format="tensorrt",
            precision="fp16",
            tensorrt_version="10.3.0.30",
            gpu="Orin",
            compute_capability="8.7",
            batch=(1, 8),
        ),
        fake_engine,
    )
    monkeypatch.setattr(engine, "current_platform", _on(platform))
    result = engine.build_for_station(root, DeployConfig(), cfg_path, build_args="--dry-run --tensorrt-version 10.3.0")
    assert result.built and why in result.reason


def test_build_runs_defectscope_build_engine_on_the_resolved_version(station, monkeypatch, capfd):
    root, cfg_path = station
    monkeypatch.setattr(engine, "current_platform", _on(ORIN))
    result = engine.build_for_station(root, DeployConfig(), cfg_path, build_args="--dry-run --tensorrt-version 10.3.0")
    assert result.built
    out = capfd.readouterr().out
    # The real version directory, not the `current` link that may switch during a long build.
    assert f'"bundle": "{root / MODELS / "tiny/1.0.0"}"' in out and '"tensorrt_version": "10.3.0"' in out


def test_a_station_without_an_installed_bundle_is_reported(tmp_path):
    root = tmp_path / "root"
    cfg = write_station(root, "line1", 9108)
    with pytest.raises(DeployError, match="cannot build an engine"):
        engine.build_for_station(root, DeployConfig(), cfg)


def test_timing_cache_reaches_defectscope_build_engine(station, monkeypatch, tmp_path, capfd):
    root, cfg_path = station
    monkeypatch.setattr(engine, "current_platform", _on(ORIN))
    cache = tmp_path / "var/cache/defectscope-engine/timing.cache"
    # --dry-run prints the plan; an unknown option would make build-engine exit 2 (a DeployError here).
    engine.build_for_station(
        root, DeployConfig(), cfg_path, timing_cache=cache, build_args="--dry-run --tensorrt-version 10.3.0"
    )


# ---- issue 25 item 13: an engine is written as a new tree, never into the tree `current` names ----------
def _built(root, version="1.0.0", extra=b"serialized engine"):
    """What `defectscope build-engine --out` leaves under <models>/.builds: the version's files + an engine."""
    from runtime.bundle.load import load_bundle
    from runtime.bundle.write import write_bundle

    src = load_bundle(root / MODELS / "tiny" / version)
    engine_file = root / "engine.tmp"
    engine_file.write_bytes(extra)
    files = {n: src.path / n for n in src.manifest.files} | {"engines/model.engine": engine_file}
    return write_bundle(root / MODELS / ".builds/b1/bundle", src.manifest, files, check_graph=False).path


def test_an_adopted_build_is_a_new_tree_and_the_old_one_is_never_rewritten(station):
    from deploy.store import ModelStore

    root, _ = station
    store = ModelStore(root / MODELS)
    old_tree = root / MODELS / "tiny/1.0.0"
    old_inode = old_tree.stat().st_ino
    before = engine._manifest_sha(old_tree)
    engine.adopt_build(store, "tiny", "1.0.0", _built(root), before)
    link = root / MODELS / "tiny/1.0.0"
    assert link.is_symlink() and str(link.readlink()).startswith(".v/1.0.0@")
    assert (root / MODELS / "tiny/current/engines/model.engine").read_bytes() == b"serialized engine"
    assert link.resolve().stat().st_ino != old_inode  # a new tree; the old one deleted once nothing named it
    assert sorted(p.name for p in link.parent.iterdir()) == [".deploy-state.json", ".v", "1.0.0", "current"]
    assert store.current("tiny") == "1.0.0" and store.versions("tiny") == ["1.0.0"]
    # A second build replaces the link's tree; nothing named is left behind.
    engine.adopt_build(store, "tiny", "1.0.0", _built(root, extra=b"engine 2"), engine._manifest_sha(link))
    assert len(list((root / MODELS / "tiny/.v").iterdir())) == 1
    deploy("prune", "--root", root)
    assert (root / MODELS / "tiny/current/engines/model.engine").read_bytes() == b"engine 2"


def test_a_version_reinstalled_during_the_build_discards_the_build(station, bundles):
    from deploy.store import ModelStore

    root, _ = station
    started_from = engine._manifest_sha(root / MODELS / "tiny/1.0.0")
    built = _built(root)
    deploy("install", bundles.archive("1.0.0", seed=1), "--root", root, "--force")  # while the build ran
    with pytest.raises(DeployError, match="changed during the engine build"):
        engine.adopt_build(ModelStore(root / MODELS), "tiny", "1.0.0", built, started_from)
    assert not (root / MODELS / "tiny/current/engines").exists()


def test_store_entry_maps_a_station_bundle_path_to_name_and_version(station, bundles):
    from deploy.store import ModelStore

    root, _ = station
    store = ModelStore(root / MODELS)
    assert engine.store_entry(store, root / MODELS / "tiny/current") == ("tiny", "1.0.0")
    assert engine.store_entry(store, root / MODELS / "tiny/1.0.0") == ("tiny", "1.0.0")
    assert engine.store_entry(store, root / "srv/bundles/tiny") is None  # not in the store: built in place
