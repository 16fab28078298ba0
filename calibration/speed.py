"""Speed-aware mixed precision for the CPU INT8 model: which leading layers run faster in float.

INT8 is not faster everywhere. On x86 ONNX Runtime the first layers of mobile
networks (the 3-channel stem conv, the first depthwise conv at full resolution) are
quicker as FP32 NCHWc kernels than as U8S8 QLinearConv, whose im2col/NHWC path is
poor for so few channels. TensorRT picks the faster precision per layer itself; for
ONNX Runtime we measure it: quantize with the first k compute layers kept in float,
time each candidate on this machine, and keep the fastest (only when it beats the
all-INT8 model by a margin, so measurement noise never adds float layers).

Only a prefix is tried: a float island in the middle would add a
dequantize/quantize and a layout change on both sides.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.quantize import QuantConfig, compute_nodes, quantize_model


@dataclass(frozen=True)
class SpeedSettings:
    """``max_prefix``: most leading layers tried in float (0 disables the search).

    ``fixed``: use exactly this many leading float layers without measuring.
    """

    max_prefix: int = 4
    fixed: int | None = None
    batch: int = 8  # images per timed inference (the runtime's default max batch)
    repeats: int = 15  # timed runs per candidate and round (median taken)
    rounds: int = 2  # candidates are timed round-robin, best round kept (drift-robust)
    min_gain: float = 0.03  # fraction faster than all-INT8 needed to keep layers in float

    def __post_init__(self) -> None:
        if self.max_prefix < 0:
            raise ValueError(f"float prefix search: max_prefix must be >= 0, got {self.max_prefix}")
        if self.fixed is not None and self.fixed < 0:
            raise ValueError(f"float prefix: expected a count >= 0, got {self.fixed}")
        if self.batch < 1 or self.repeats < 1 or self.rounds < 1:
            raise ValueError("float prefix search: batch, repeats and rounds must be >= 1")
        if self.min_gain < 0:
            raise ValueError(f"float prefix search: min_gain must be >= 0, got {self.min_gain}")

    @classmethod
    def parse(cls, value: str, **kwargs: Any) -> SpeedSettings:
        """``auto`` (search up to 4), ``auto:N`` (search up to N) or ``N`` (fixed, no timing)."""
        text = value.strip().lower()
        try:
            if text == "auto":
                return cls(**kwargs)
            if text.startswith("auto:"):
                return cls(max_prefix=int(text[5:]), **kwargs)
            return cls(fixed=int(text), **kwargs)
        except ValueError as exc:
            if "invalid literal" in str(exc):
                raise ValueError(f"--float-prefix: expected 'auto', 'auto:N' or a count N, got {value!r}") from None
            raise


@dataclass
class SpeedResult:
    float_nodes: tuple[str, ...]  # the chosen leading layers kept in float
    trials: list[dict[str, Any]] = field(default_factory=list)  # {prefix, nodes, img_per_s}
    measured: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_prefix": len(self.float_nodes),
            "float_nodes": list(self.float_nodes),
            "measured": self.measured,
            "trials": self.trials,
        }


def throughput(session: Any, x: np.ndarray, repeats: int, warmup: int = 3) -> float:
    """Median images/s of ``session`` on the batch ``x`` (N,C,H,W) float32."""
    name = session.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(x)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return len(x) / float(np.median(times))


def search_float_prefix(
    prepared: str | Path,
    config: QuantConfig,
    ranges: str | Path,
    x: np.ndarray,
    settings: SpeedSettings,
    threads: int | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> SpeedResult:
    """Choose how many leading compute layers of ``prepared`` stay in float for the fastest CPU model.

    ``x`` (N,C,H,W) float32: images to time on (the first ``settings.batch`` are used;
    repeated when fewer). The calibration ranges in ``ranges`` must exist already.
    """
    from calibration.evaluate import ort_session

    nodes = [n.name for n in compute_nodes(prepared)]
    if settings.fixed is not None:
        if settings.fixed > len(nodes):
            raise ValueError(f"--float-prefix {settings.fixed}: the model has only {len(nodes)} compute layers")
        return SpeedResult(tuple(nodes[: settings.fixed]))
    limit = min(settings.max_prefix, max(len(nodes) - 1, 0))
    if limit == 0:
        return SpeedResult(())
    if len(x) == 0:
        raise ValueError("float prefix search needs at least one image")
    batch = np.resize(x[: settings.batch], (settings.batch, *x.shape[1:])).astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="defectscope-speed-") as tmp:
        sessions = {}
        for k in range(limit + 1):
            path = Path(tmp) / f"prefix{k}.onnx"
            quantize_model(prepared, path, config, ranges, nodes_to_exclude=nodes[:k])
            sessions[k] = ort_session(path, threads)
        best: dict[int, float] = {}
        for _ in range(settings.rounds):
            for k, sess in sessions.items():
                best[k] = max(best.get(k, 0.0), throughput(sess, batch, settings.repeats))
    trials = [{"prefix": k, "nodes": nodes[:k], "img_per_s": round(v, 2)} for k, v in best.items()]
    fastest = max(best, key=lambda k: (best[k], -k))
    if best[fastest] < best[0] * (1.0 + settings.min_gain):
        fastest = 0
    if log:
        log(
            f"float prefix timing (batch {settings.batch}): "
            + ", ".join(f"{k}: {v:.0f} img/s" for k, v in best.items())
            + f" -> keep {fastest} in float"
        )
    return SpeedResult(tuple(nodes[:fastest]), trials, measured=True)
