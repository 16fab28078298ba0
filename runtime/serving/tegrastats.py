"""Parse one line of NVIDIA's ``tegrastats`` (Jetson) into a :class:`DeviceSample`; pure, no I/O.

Formats seen across JetPack releases (tests/runtime/fixtures/tegrastats_*.txt):

- Orin, JetPack 5/6: ``... RAM 5012/30536MB ... CPU [3%@729,1%@729,off,...] EMC_FREQ 0%@2133
  GR3D_FREQ 0%@[305,305] ... cpu@46.4C soc2@44.8C gpu@44.6C tj@46.4C ... VDD_GPU_SOC 2387mW/2387mW
  VDD_CPU_CV 398mW/398mW VIN_SYS_5V0 2724mW/2724mW`` (JetPack 5: ``GR3D_FREQ 0%@305``);
- Xavier, JetPack 4/5: ``... GR3D_FREQ 0%@1377 ... GPU@38.5C Tdiode@40.25C ... GPU 0/0 CPU 155/155
  SOC 1395/1395`` (rails without a unit: mW).

Rails are instantaneous/average mW; sensors °C (a disabled sensor reads -256C and is dropped).
tegrastats has no throttling flag: throttling is judged from the temperatures (the alert rule)
or, on x86, from NVML's clock-event reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C(?=\s|$)")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
MIN_VALID_C = -40.0  # below: a sensor tegrastats reports as absent (-256C)


@dataclass
class DeviceSample:
    """One reading of the device; None / empty where the source does not report it."""

    gpu_utilization: float | None = None  # 0..1
    gpu_frequency_hz: float | None = None
    cpu_utilization: float | None = None  # 0..1, mean over online cores
    cpu_online: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)  # sensor (lower case) -> °C
    power_w: dict[str, float] = field(default_factory=dict)  # rail -> W (instantaneous)
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    throttled: dict[str, bool] = field(default_factory=dict)  # reason -> active (NVML)


class ParseError(ValueError):
    """Not a tegrastats line (no RAM / CPU / GR3D field)."""


def parse_tegrastats(line: str) -> DeviceSample:
    """One tegrastats line -> DeviceSample; ParseError when it carries none of RAM, CPU and GR3D_FREQ."""
    s = DeviceSample()
    ram, cpu, gpu = _RAM.search(line), _CPU.search(line), _GPU.search(line)
    if not (ram or cpu or gpu):
        raise ParseError(f"not a tegrastats line: {line[:80]!r}")
    if ram:
        s.memory_used_bytes = int(ram.group(1)) * 1024 * 1024
        s.memory_total_bytes = int(ram.group(2)) * 1024 * 1024
    if cpu:
        loads = [int(m.group(1)) for m in (re.match(r"(\d+)%", c.strip()) for c in cpu.group(1).split(",")) if m]
        if loads:
            s.cpu_utilization = sum(loads) / (100.0 * len(loads))
            s.cpu_online = len(loads)
    if gpu:
        s.gpu_utilization = int(gpu.group(1)) / 100.0
        if gpu.group(2):
            s.gpu_frequency_hz = int(gpu.group(2)) * 1e6
    rest = line[cpu.end() :] if cpu else line  # CPU [...] entries are not temperatures or rails
    for name, value in _TEMP.findall(rest):
        c = float(value)
        if c > MIN_VALID_C:
            s.temperatures_c[name.lower()] = c
    for name, now, _avg in _RAIL.findall(rest):
        if name not in ("RAM", "SWAP", "IRAM"):
            s.power_w[name] = int(now) / 1000.0
    return s


__all__ = ["DeviceSample", "ParseError", "parse_tegrastats"]
