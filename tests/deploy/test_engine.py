"""`deploy build-engine`: what defectscope-engine@<station>.service runs (TensorRT itself is not here)."""

from __future__ import annotations

import pytest

from deploy import engine
from deploy.config import DeployConfig, DeployError
from runtime.bundle import Artifact, add_artifact
from runtime.engine_meta import EngineUnavailableError, Platform

ORIN = Platform("10.3.0.30", "Orin", "8.7")


def _on(platform):
    return lambda: platform
from tests.deploy.conftest import MODELS, deploy, write_station


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
    add_artifact(root / MODELS / "tiny/current", "trt-fp16",
                 Artifact(file="engines/model.fp16.engine", format="tensorrt", precision="fp16",
                          tensorrt_version="10.3.0", gpu="Orin", compute_capability="8.7", batch=(1, 8)), fake_engine)
    # The platform probe needs a GPU; the decision is the runtime's own engine_problems().
    monkeypatch.setattr(engine, "current_platform", _on(ORIN))
    result = engine.build_for_station(root, DeployConfig(), cfg_path)
    assert not result.built and "already has engine 'trt-fp16' for TensorRT 10.3.0.30 on Orin" in result.reason
    # Another TensorRT version on the device: the engine must be rebuilt (build_args: a dry run).
    monkeypatch.setattr(engine, "current_platform", _on(Platform("10.4.0", "Orin", "8.7")))
    result = engine.build_for_station(root, DeployConfig(), cfg_path, build_args="--dry-run --tensorrt-version 10.4.0")
    assert result.built and "built with TensorRT 10.3.0" in result.reason


@pytest.mark.parametrize("platform, why", [
    (Platform("10.3.0.30", "NVIDIA A2", "8.6"), "compute capability 8.7"),  # same TensorRT, another GPU
    (Platform("10.3.0.30", "Orin Nano", "8.7"), "built on GPU 'Orin'"),  # same sm, another GPU model
])
def test_an_engine_for_another_gpu_is_rebuilt_like_the_runtime_would_refuse_it(station, monkeypatch, tmp_path,
                                                                                 platform, why):
    """Issue 14 item 11: before, only the TensorRT version was compared, so these engines were kept."""
    root, cfg_path = station
    fake_engine = tmp_path / "model.fp16.engine"
    fake_engine.write_bytes(b"engine bytes")
    add_artifact(root / MODELS / "tiny/current", "trt-fp16",
                 Artifact(file="engines/model.fp16.engine", format="tensorrt", precision="fp16",
                          tensorrt_version="10.3.0.30", gpu="Orin", compute_capability="8.7", batch=(1, 8)), fake_engine)
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
    engine.build_for_station(root, DeployConfig(), cfg_path, timing_cache=cache,
                             build_args="--dry-run --tensorrt-version 10.3.0")
