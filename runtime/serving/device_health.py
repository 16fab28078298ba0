"""Device health in /metrics: GPU / CPU load, temperatures, power, memory and throttling.

Sources (``[device_health] source``; ``auto`` takes the first that works here, and logs why the
others did not):

- ``tegrastats`` (Jetson): NVIDIA's tool run as a subprocess with ``--interval``, each line parsed
  by :mod:`runtime.serving.tegrastats`;
- ``jtop`` (Jetson, jetson-stats installed): its ``stats`` dict, read every interval;
- ``nvml`` (x86 with an NVIDIA GPU; nvidia-ml-py / pynvml): utilisation, temperature, power,
  memory and the clock-event (throttle) reasons of each GPU.

The libraries and the tool are found and imported only when the monitor starts. A source that
dies is logged and counted (``defectscope_device_health_errors_total``); serving never depends on it.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from runtime.serving.tegrastats import DeviceSample, ParseError, parse_tegrastats

log = logging.getLogger("defectscope.device_health")

SOURCES = ("auto", "tegrastats", "jtop", "nvml", "off")
MAX_LABELS = 64  # sensors / rails per family: a misbehaving source cannot grow the registry without bound
# NVML clock-event ("throttle") reason bits (nvml.h nvmlClocksEventReason*) -> the reason label.
NVML_REASONS = {
    0x4: "power",  # SW power cap
    0x8: "hw_slowdown",  # HW slowdown (thermal or power brake)
    0x20: "thermal",  # SW thermal slowdown
    0x40: "thermal",  # HW thermal slowdown
    0x80: "power",  # HW power brake
}
THROTTLE_REASONS = ("thermal", "power", "hw_slowdown")


@dataclass(frozen=True)
class DeviceHealthConfig:
    source: str = "auto"  # SOURCES
    interval_s: float = 1.0  # how often a source reports
    tegrastats: str = "tegrastats"  # the command (a name on PATH or a path)
    gpu_index: int = 0  # NVML: which GPU


class DeviceMetrics:
    """The defectscope_device_* series (registered on the daemon's registry by runtime.serving.metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.gpu_util = Gauge("defectscope_device_gpu_utilization_ratio", "GPU busy fraction (0..1)", registry=r)
        self.gpu_freq = Gauge("defectscope_device_gpu_frequency_hertz", "GPU clock", registry=r)
        self.cpu_util = Gauge(
            "defectscope_device_cpu_utilization_ratio", "CPU busy fraction, mean of online cores (0..1)", registry=r
        )
        self.temperature = Gauge(
            "defectscope_device_temperature_celsius", "Device temperature by sensor", ["sensor"], registry=r
        )
        self.power = Gauge("defectscope_device_power_watts", "Power by rail (instantaneous)", ["rail"], registry=r)
        self.memory_used = Gauge("defectscope_device_memory_used_bytes", "Device memory in use", registry=r)
        self.memory_total = Gauge("defectscope_device_memory_total_bytes", "Device memory", registry=r)
        self.throttled = Gauge(
            "defectscope_device_throttled", "1 while clocks are held down, by reason (NVML)", ["reason"], registry=r
        )
        self.source = Gauge(
            "defectscope_device_health_source", "1 for the device-health source in use", ["source"], registry=r
        )
        self.samples = Counter("defectscope_device_health_samples_total", "Device-health readings", registry=r)
        self.errors = Counter(
            "defectscope_device_health_errors_total",
            "Unreadable device-health output or a source that died",
            registry=r,
        )
        self._labels: dict[str, set[str]] = {"sensor": set(), "rail": set()}

    def _bounded(self, kind: str, name: str) -> bool:
        seen = self._labels[kind]
        if name in seen or len(seen) < MAX_LABELS:
            seen.add(name)
            return True
        return False

    def update(self, s: DeviceSample) -> None:
        for value, gauge in (
            (s.gpu_utilization, self.gpu_util),
            (s.gpu_frequency_hz, self.gpu_freq),
            (s.cpu_utilization, self.cpu_util),
            (s.memory_used_bytes, self.memory_used),
            (s.memory_total_bytes, self.memory_total),
        ):
            if value is not None:
                gauge.set(value)
        for sensor, c in s.temperatures_c.items():
            if self._bounded("sensor", sensor):
                self.temperature.labels(sensor).set(c)
        for rail, w in s.power_w.items():
            if self._bounded("rail", rail):
                self.power.labels(rail).set(w)
        for reason, on in s.throttled.items():
            self.throttled.labels(reason).set(1 if on else 0)
        self.samples.inc()


def nvml_throttle(bits: int) -> dict[str, bool]:
    """NVML clock-event reason bits -> {reason: active} for every THROTTLE_REASONS entry."""
    out = dict.fromkeys(THROTTLE_REASONS, False)
    for bit, reason in NVML_REASONS.items():
        if bits & bit:
            out[reason] = True
    return out


def sample_from_jtop(stats: Mapping[str, Any]) -> DeviceSample:
    """jetson-stats' ``jtop.stats`` dict (``CPU1``.. percent or "OFF", ``GPU`` percent, ``Temp <sensor>`` °C,
    ``Power <rail>`` mW) -> DeviceSample."""
    s = DeviceSample()
    cpus = [v for k, v in stats.items() if k.startswith("CPU") and k[3:].isdigit() and isinstance(v, (int, float))]
    if cpus:
        s.cpu_utilization = sum(cpus) / (100.0 * len(cpus))
        s.cpu_online = len(cpus)
    if isinstance(stats.get("GPU"), (int, float)):
        s.gpu_utilization = float(stats["GPU"]) / 100.0
    for k, v in stats.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k.startswith("Temp ") and v > -40:
            s.temperatures_c[k[5:].lower()] = float(v)
        elif k.startswith("Power "):
            s.power_w[k[6:]] = float(v) / 1000.0
    return s


class DeviceHealth:
    """Runs the chosen source on its own thread and feeds DeviceMetrics; ``stop()`` ends it."""

    def __init__(self, cfg: DeviceHealthConfig, metrics: DeviceMetrics) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.source: str | None = None
        self.skipped: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> str | None:
        """Start the first usable source; returns its name, or None (logged why)."""
        if self.cfg.source == "off":
            return None
        order = ("tegrastats", "jtop", "nvml") if self.cfg.source == "auto" else (self.cfg.source,)
        for name in order:
            why = self._unavailable(name)
            if why is None:
                try:
                    runner = self._open(name)
                except Exception as exc:  # a tool that will not start, an NVML without a GPU: try the next
                    why = f"{type(exc).__name__}: {exc}"
                else:
                    self.source = name
                    self.metrics.source.labels(name).set(1)
                    self._thread = threading.Thread(
                        target=self._guard, args=(runner,), name="device-health", daemon=True
                    )
                    self._thread.start()
                    log.info("device health from %s every %.1fs", name, self.cfg.interval_s)
                    return name
            self.skipped.append(f"{name}: {why}")
        log.info("no device-health source: %s", "; ".join(self.skipped))
        return None

    def _unavailable(self, name: str) -> str | None:
        if name == "tegrastats":
            return None if shutil.which(self.cfg.tegrastats) else f"{self.cfg.tegrastats!r} not found (not a Jetson)"
        if name == "jtop":
            return None if importlib.util.find_spec("jtop") else "jetson-stats is not installed"
        if importlib.util.find_spec("pynvml") is None:
            return "nvidia-ml-py (pynvml) is not installed"
        return None

    def _open(self, name: str) -> Callable[[], None]:
        if name == "tegrastats":
            ms = max(1, int(self.cfg.interval_s * 1000))
            self._proc = subprocess.Popen(
                [self.cfg.tegrastats, "--interval", str(ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
            return self._read_tegrastats
        if name == "jtop":
            from jtop import jtop

            handle = jtop(interval=self.cfg.interval_s)
            handle.start()
            return lambda: self._read_jtop(handle)
        import pynvml

        pynvml.nvmlInit()
        return lambda: self._read_nvml(pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.cfg.gpu_index))

    def _guard(self, runner: Callable[[], None]) -> None:
        try:
            runner()
        except Exception:
            self.metrics.errors.inc()
            log.exception("device health (%s) stopped", self.source)

    def _read_tegrastats(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            if self._stop.is_set():
                break
            try:
                self.metrics.update(parse_tegrastats(line))
            except ParseError:
                self.metrics.errors.inc()
        if not self._stop.is_set():
            self.metrics.errors.inc()
            log.warning("tegrastats exited (%s); device health stops", proc.poll())

    def _read_jtop(self, handle: Any) -> None:
        try:
            while not self._stop.is_set() and handle.ok():
                self.metrics.update(sample_from_jtop(handle.stats))
                self._stop.wait(self.cfg.interval_s)
        finally:
            handle.close()

    def _read_nvml(self, nvml: Any, h: Any) -> None:
        reasons = (
            getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        try:
            while not self._stop.is_set():
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                s = DeviceSample(
                    gpu_utilization=nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
                    gpu_frequency_hz=nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_GRAPHICS) * 1e6,
                    temperatures_c={"gpu": float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))},
                    power_w={"gpu": nvml.nvmlDeviceGetPowerUsage(h) / 1000.0},
                    memory_used_bytes=float(mem.used),
                    memory_total_bytes=float(mem.total),
                    throttled=nvml_throttle(int(reasons(h))),
                )
                self.metrics.update(s)
                self._stop.wait(self.cfg.interval_s)
        finally:
            nvml.nvmlShutdown()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout_s)


__all__ = [
    "DeviceHealth",
    "DeviceHealthConfig",
    "DeviceMetrics",
    "NVML_REASONS",
    "SOURCES",
    "nvml_throttle",
    "sample_from_jtop",
]
