"""Device health: the tegrastats parser on recorded Orin / Orin Nano / Xavier lines, jetson-stats and
NVML mappings, tegrastats run as a real subprocess (a stand-in script printing recorded lines at the
asked interval) feeding the metrics, the daemon's /metrics over real HTTP, and source selection."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from runtime.serving.device_health import (
    DeviceHealth,
    DeviceHealthConfig,
    DeviceMetrics,
    nvml_throttle,
    sample_from_jtop,
)
from runtime.serving.tegrastats import ParseError, parse_tegrastats

FIXTURES = Path(__file__).parent / "fixtures"


def _lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def test_orin_jetpack6_lines() -> None:
    idle, busy = (parse_tegrastats(x) for x in _lines("tegrastats_orin_jp6.txt"))
    assert idle.gpu_utilization == 0.0 and idle.gpu_frequency_hz == 305e6
    assert busy.gpu_utilization == 0.97 and busy.gpu_frequency_hz == 1300e6
    assert busy.cpu_online == 8 and busy.cpu_utilization == pytest.approx((41 + 38 + 45 + 40 + 52 + 35 + 39 + 30) / 800)
    assert busy.temperatures_c == {
        "cpu": 71.25,
        "soc2": 68.5,
        "soc0": 69.343,
        "gpu": 74.968,
        "tj": 75.218,
        "soc1": 69.031,
    }
    assert busy.power_w == {"VDD_GPU_SOC": 19.634, "VDD_CPU_CV": 6.731, "VIN_SYS_5V0": 7.47}
    assert busy.memory_used_bytes == 6120 * 2**20 and busy.memory_total_bytes == 30536 * 2**20


def test_orin_nano_jetpack5_drops_absent_sensors() -> None:
    (s,) = (parse_tegrastats(x) for x in _lines("tegrastats_orin_nano_jp5.txt"))
    assert s.gpu_utilization == 0.88 and s.gpu_frequency_hz == 624e6 and s.cpu_online == 4
    assert "cv1" not in s.temperatures_c and s.temperatures_c["tj"] == 53.062  # CV1@-256C: no sensor
    assert s.power_w == {"VDD_IN": 7.317, "VDD_CPU_GPU_CV": 2.745, "VDD_SOC": 1.665}


def test_xavier_jetpack4_rails_without_units() -> None:
    idle, hot = (parse_tegrastats(x) for x in _lines("tegrastats_xavier_jp4.txt"))
    assert idle.power_w == {"GPU": 0.0, "CPU": 0.155, "SOC": 1.395, "CV": 0.0, "VDDRQ": 0.31, "SYS5V": 1.82}
    assert hot.gpu_utilization == 0.99 and hot.temperatures_c["gpu"] == 89.5 and hot.temperatures_c["tdiode"] == 87.75
    assert hot.power_w["GPU"] == 14.021 and hot.cpu_online == 8


def test_a_line_that_is_not_tegrastats_is_refused() -> None:
    with pytest.raises(ParseError):
        parse_tegrastats("tegrastats: permission denied")


def test_nvml_reasons_and_jtop_stats() -> None:
    assert nvml_throttle(0) == {"thermal": False, "power": False, "hw_slowdown": False}
    assert nvml_throttle(0x40 | 0x1) == {"thermal": True, "power": False, "hw_slowdown": False}  # + GPU idle bit
    assert nvml_throttle(0x4)["power"] and nvml_throttle(0x8)["hw_slowdown"]
    stats = {
        "time": 0,
        "CPU1": 20,
        "CPU2": 40,
        "CPU3": "OFF",
        "GPU": 55.0,
        "Temp tj": 61.5,
        "Temp cv0": -256,
        "Power VDD_GPU_SOC": 5200,
        "Power TOT": 9100,
        "jetson_clocks": "OFF",
        "nvp model": "MAXN",
    }
    s = sample_from_jtop(stats)
    assert s.cpu_utilization == pytest.approx(0.3) and s.cpu_online == 2 and s.gpu_utilization == 0.55
    assert s.temperatures_c == {"tj": 61.5} and s.power_w == {"VDD_GPU_SOC": 5.2, "TOT": 9.1}


def fake_tegrastats(tmp_path: Path, fixture: str = "tegrastats_orin_jp6.txt") -> Path:
    """An executable standing in for NVIDIA's tegrastats: prints recorded lines every --interval ms, forever."""
    script = tmp_path / "tegrastats"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        "ms = int(sys.argv[sys.argv.index('--interval') + 1])\n"
        f"lines = open({str(FIXTURES / fixture)!r}).read().splitlines()\n"
        "i = 0\n"
        "while True:\n"
        "    print(lines[i % len(lines)], flush=True)\n"
        "    i += 1\n"
        "    time.sleep(ms / 1000)\n"
    )
    script.chmod(0o755)
    return script


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def _until(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_tegrastats_subprocess_feeds_the_metrics_and_stops(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    health = DeviceHealth(
        DeviceHealthConfig(source="tegrastats", interval_s=0.1, tegrastats=str(fake_tegrastats(tmp_path))),
        DeviceMetrics(reg),
    )
    assert health.start() == "tegrastats"
    try:
        _until(lambda: (_value(reg, "defectscope_device_health_samples_total") or 0) >= 2)
        assert _value(reg, "defectscope_device_health_source", source="tegrastats") == 1
        assert _value(reg, "defectscope_device_temperature_celsius", sensor="tj") in (46.406, 75.218)
        assert _value(reg, "defectscope_device_power_watts", rail="VDD_GPU_SOC") in (2.387, 19.634)
        assert _value(reg, "defectscope_device_memory_total_bytes") == 30536 * 2**20
    finally:
        health.stop()
    assert health._proc is not None and health._proc.poll() is not None  # the subprocess is gone
    assert _value(reg, "defectscope_device_health_errors_total") == 0


def test_auto_without_any_source_logs_why_and_exports_nothing(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    health = DeviceHealth(DeviceHealthConfig(tegrastats=str(tmp_path / "no-tegrastats")), DeviceMetrics(reg))
    got = health.start()
    try:
        assert health.skipped[0].startswith("tegrastats: ") and "not found (not a Jetson)" in health.skipped[0]
        if got is None:  # this machine: no Jetson, no jetson-stats, no NVIDIA GPU
            assert [s.split(":")[0] for s in health.skipped] == ["tegrastats", "jtop", "nvml"]
            assert _value(reg, "defectscope_device_health_samples_total") == 0
    finally:
        health.stop()
    off = DeviceHealth(DeviceHealthConfig(source="off"), DeviceMetrics(CollectorRegistry()))
    assert off.start() is None and off.skipped == []


def test_daemon_metrics_carry_the_device_series(tmp_path: Path) -> None:
    from runtime.config.station import load_config
    from runtime.serving.daemon import Daemon

    from ._helpers import make_bundle, make_images, metric, scrape, station_config

    make_images(tmp_path / "replay", ["ok"] * 3)
    config, _ = station_config(
        tmp_path,
        make_bundle(tmp_path / "bundle"),
        [{"id": "cam1", "source": str(tmp_path / "replay"), "loop": True}],
        device_health={"source": "tegrastats", "interval_s": 0.1, "tegrastats": str(fake_tegrastats(tmp_path))},
    )
    d = Daemon(load_config(config), config_path=config)
    try:
        d.start()
        assert d.http is not None
        url = f"http://127.0.0.1:{d.http.port}/metrics"
        _until(lambda: metric(scrape(url), "defectscope_device_health_samples_total") >= 2)
        samples = scrape(url)
        assert metric(samples, "defectscope_device_gpu_utilization_ratio") in (0.0, 0.97)
        assert metric(samples, "defectscope_device_temperature_celsius", sensor="gpu") > 40
    finally:
        d.shutdown()
    assert d.device_health is not None and d.device_health._proc.poll() is not None
