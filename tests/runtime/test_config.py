"""Station config: valid files load with defaults resolved; bad ones are refused naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config.station import ConfigError, guess_kind, load_config

from ._helpers import ROOT, write_config

EXAMPLE = ROOT / "runtime" / "examples" / "station.toml"


@pytest.fixture
def replay_dir(tmp_path: Path) -> Path:
    d = tmp_path / "replay"
    d.mkdir()
    return d


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "line3.toml"
    p.write_text(text)
    return p


def test_minimal_config_resolves_defaults_and_relative_paths(tmp_path: Path, replay_dir: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            """
[model]
bundle = "models/current"

[[cameras]]
id = "cam1"
source = "replay"

[[cameras]]
id = "cam2"
source = "rtsp://user:pw@10.0.0.2/stream"
fps = 12.5
roi = [10, 20, 100, 80]
rotate = 90
""",
        )
    )
    assert cfg.station == "line3"  # defaults to the file stem (= systemd instance name)
    assert cfg.model.bundle == tmp_path / "models" / "current"
    assert cfg.model.backend == "auto"
    cam1, cam2 = cfg.cameras
    assert (cam1.kind, cam1.on_full, cam1.finite) == ("directory", "block", True)
    assert cam1.source == str(replay_dir)
    assert (cam2.kind, cam2.on_full, cam2.fps, cam2.roi, cam2.rotate) == (
        "rtsp",
        "drop_oldest",
        12.5,
        (10, 20, 100, 80),
        90,
    )
    assert cfg.metrics.host == "127.0.0.1" and cfg.metrics.port == 9108
    assert cfg.publisher.bind == ("tcp://127.0.0.1:5555",)
    assert cfg.to_dict()["cameras"][1]["roi"] == [10, 20, 100, 80]


@pytest.mark.parametrize(
    ("body", "key", "expected"),
    [
        ('[[cameras]]\nid="c"\nsource="0"\n', "model.bundle", "missing"),
        ('[model]\nbundle="b"\n', "cameras", "at least one"),
        ('[model]\nbundle="b"\nbackend="cuda"\n[[cameras]]\nid="c"\nsource="0"\n', "model.backend", "expected one of"),
        ('[model]\nbundle="b"\n[[cameras]]\nid="c"\nsource="0"\nfps=-2\n', "cameras[0].fps", "> 0"),
        ('[model]\nbundle="b"\n[[cameras]]\nid="c.1"\nsource="0"\n', "cameras[0].id", "no dots"),
        (
            '[model]\nbundle="b"\n[[cameras]]\nid="c"\nsource="0"\n[[cameras]]\nid="c"\nsource="1"\n',
            "cameras[1].id",
            "duplicate",
        ),
        ('[model]\nbundle="b"\n[[cameras]]\nid="c"\nsource="0"\nrotate=45\n', "cameras[0].rotate", "degrees"),
        (
            '[model]\nbundle="b"\n[[cameras]]\nid="c"\nsource="0"\nroi=[1,2,3]\n',
            "cameras[0].roi",
            "[x, y, width, height]",
        ),
        (
            '[model]\nbundle="b"\n[[cameras]]\nid="c"\nsource="/nonexistent/v.mp4"\n',
            "cameras[0].source",
            "does not exist",
        ),
        (
            '[model]\nbundle="b"\n[tta]\nviews=["original","rot45"]\n[[cameras]]\nid="c"\nsource="0"\n',
            "tta.views",
            "unknown view",
        ),
        ('[model]\nbundle="b"\n[tta]\nviews="flipz"\n[[cameras]]\nid="c"\nsource="0"\n', "tta.views", "preset"),
        (
            '[model]\nbundle="b"\n[tta]\nviews=["hflip","hflip"]\n[[cameras]]\nid="c"\nsource="0"\n',
            "tta.views",
            "duplicate",
        ),
        ('[model]\nbundle="b"\n[tta]\nviews=[]\n[[cameras]]\nid="c"\nsource="0"\n', "tta.views", "non-empty"),
        ('[model]\nbundle="b"\n[[cameras]]\nid="c"\nsource="0"\npreload_mb=-1\n', "cameras[0].preload_mb", ">= 0"),
        (
            '[model]\nbundle="b"\n[[cameras]]\nid="c"\nsource="0"\npreload_mb="lots"\n',
            "cameras[0].preload_mb",
            "number",
        ),
        (
            '[model]\nbundle="b"\n[tta]\nmode="sometimes"\n[[cameras]]\nid="c"\nsource="0"\n',
            "tta.mode",
            "'always', 'uncertain'",
        ),
        (
            '[model]\nbundle="b"\n[tta]\nmode="uncertain"\n[[cameras]]\nid="c"\nsource="0"\n',
            "tta.mode",
            "at least two views",
        ),
        (
            '[model]\nbundle="b"\n[tta]\nviews=["original","hflip"]\nmode="uncertain"\nband=0\n[[cameras]]\nid="c"\n'
            'source="0"\n',
            "tta.band",
            "> 0",
        ),
        (
            '[model]\nbundle="b"\n[decision]\nthresholds={defect=1.5}\n[[cameras]]\nid="c"\nsource="0"\n',
            "decision.thresholds.defect",
            "[0, 1]",
        ),
        (
            '[model]\nbundle="b"\n[publisher]\nbind=["5555"]\n[[cameras]]\nid="c"\nsource="0"\n',
            "publisher.bind",
            "endpoints",
        ),
        ('[model]\nbundle="b"\n[metrics]\nport=70000\n[[cameras]]\nid="c"\nsource="0"\n', "metrics.port", "<= 65535"),
        (
            '[model]\nbundle="b"\n[batching]\nmax_batch=true\n[[cameras]]\nid="c"\nsource="0"\n',
            "batching.max_batch",
            "integer",
        ),
        (
            '[model]\nbundle="b"\n[snapshots]\nverdicts=["bad"]\n[[cameras]]\nid="c"\nsource="0"\n',
            "snapshots.verdicts",
            "verdicts",
        ),
        (
            '[model]\nbundle="b"\n[publisher.curve]\nserver_secret_key="nokey"\n[[cameras]]\nid="c"\nsource="0"\n',
            "publisher.curve.server_secret_key",
            "does not exist",
        ),
        ('[model]\nbundle="b"\nmin_frame_side=0\n[[cameras]]\nid="c"\nsource="0"\n', "model.min_frame_side", ">= 1"),
        (
            '[model]\nbundle="b"\n[publisher]\nmax_inbound_bytes=8\n[[cameras]]\nid="c"\nsource="0"\n',
            "publisher.max_inbound_bytes",
            ">= 64",
        ),
        (
            '[model]\nbundle="b"\n[metrics]\nhttp_max_connections=0\n[[cameras]]\nid="c"\nsource="0"\n',
            "metrics.http_max_connections",
            ">= 1",
        ),
        (
            '[model]\nbundle="b"\n[metrics]\nhttp_timeout_s=0\n[[cameras]]\nid="c"\nsource="0"\n',
            "metrics.http_timeout_s",
            "> 0",
        ),
    ],
)
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, body: str, key: str, expected: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"key '{key}'" in msg
    assert expected in msg


@pytest.mark.parametrize(
    "body, names",
    [
        (
            '[model]\nbundle="b"\n[[cameras]]\nid="c"\nsource="0"\nsoruce="1"\nfsp=2\n',
            "['cameras[0].fsp', 'cameras[0].soruce']",
        ),
        ('[model]\nbundle="b"\n[modle]\n[[cameras]]\nid="c"\nsource="0"\n', "['modle']"),
    ],
)
def test_unknown_keys_are_refused_all_named_with_the_accepted_ones(tmp_path: Path, body: str, names: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: unknown key(s) {names}; expected some of [")
    assert "'source'" in msg or "'model'" in msg


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[model\nbundle=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_serve_refuses_bad_config_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.serving.serve_cli import main

    path = write_config(tmp_path / "s.toml", {"model": {"bundle": "b", "threads": 0}}, [{"id": "c", "source": "0"}])
    assert main(["--config", str(path)]) == 2
    assert "key 'model.threads'" in capsys.readouterr().err


def test_guess_kind(tmp_path: Path) -> None:
    assert guess_kind("rtsp://cam/1") == "rtsp"
    assert guess_kind("http://cam/video.mjpg") == "http"
    assert guess_kind("2") == "v4l2"
    assert guess_kind("/dev/video1") == "v4l2"
    assert guess_kind("nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink") == "gstreamer"
    assert guess_kind(str(tmp_path)) == "directory"
    assert guess_kind(str(tmp_path / "line.mp4")) == "video"


def test_example_station_config_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.station == "line3-el"
    assert [c.kind for c in cfg.cameras] == ["rtsp", "v4l2", "gstreamer"]
    assert cfg.tta.views == ("original", "hflip", "vflip")
    assert (cfg.tta.mode, cfg.tta.band) == ("uncertain", 0.2)


@pytest.mark.parametrize(
    ("views", "expected"),
    [
        ('"flips"', ("original", "hflip", "vflip", "rot180")),
        ('["original", "multiscale"]', ("original", "scale:0.9", "scale:1.1")),
        # presets expand in place; the first named view stays first (it judges in "uncertain" mode)
        ('["vflip", "flips"]', ("vflip", "original", "hflip", "rot180")),
        ('["dihedral"]', ("original", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "transverse")),
        ('"none"', ("original",)),
    ],
)
def test_tta_views_accept_the_evaluate_presets(tmp_path: Path, views: str, expected: tuple[str, ...]) -> None:
    path = tmp_path / "s.toml"
    path.write_text(f'[model]\nbundle="b"\n[tta]\nviews={views}\n[[cameras]]\nid="c"\nsource="0"\n')
    assert load_config(path).tta.views == expected


def test_example_binds_the_verdict_stream_to_localhost_unless_curve_is_on() -> None:
    """An example copied to a station must not publish verdicts to the factory network in clear."""
    from runtime.serving.daemon import _loopback

    cfg = load_config(EXAMPLE)
    assert cfg.publisher.curve is None
    assert cfg.publisher.bind and all(_loopback(ep) for ep in cfg.publisher.bind)
    assert cfg.metrics.host == "127.0.0.1"
    assert _loopback("tcp://127.0.0.1:5555") and _loopback("ipc:///run/x.sock") and _loopback("tcp://[::1]:5")
    assert not _loopback("tcp://0.0.0.0:5555") and not _loopback("tcp://*:5555") and not _loopback("tcp://eth0:5")


def test_example_documents_every_accepted_key() -> None:
    """Every key the loader accepts appears in the example (set or commented out)."""
    import dataclasses
    import re

    from runtime.config import station as c

    seen: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        line = line.lstrip("# ").rstrip()  # commented-out keys document their default too
        if m := re.match(r"^\[\[?([\w.]+)\]\]?", line):
            section = m.group(1)
        elif m := re.match(r"^(\w+) = ", line):
            seen.setdefault(section, set()).add(m.group(1))
    sections = {
        "model": c.ModelConfig,
        "batching": c.BatchingConfig,
        "tta": c.TTAConfig,
        "decision": c.DecisionConfig,
        "publisher": c.PublisherConfig,
        "metrics": c.MetricsConfig,
        "snapshots": c.SnapshotConfig,
        "daemon": c.DaemonConfig,
        "publisher.curve": c.CurveConfig,
        "model.openvino": c.OpenVINOConfig,
        "preview": c.PreviewConfig,
        "device_health": c.DeviceHealthConfig,
        "cameras": c.CameraConfig,
    }
    assert set(c.SECTIONS) <= set(sections)
    missing = [
        f"{name}.{f.name}"
        for name, cls in sections.items()
        for f in dataclasses.fields(cls)
        if f.name not in ("curve", "openvino") and f.name not in seen.get(name, set())
    ]
    assert not missing, f"keys missing from {EXAMPLE.name}: {missing}"
