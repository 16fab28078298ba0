"""Quantize -> evaluate -> gate -> (float fallback search) for one INT8 target."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.evaluate import Metrics, evaluate_onnx
from calibration.fallback import search_float_nodes
from calibration.gate import GateResult, check_gate
from calibration.quantize import QuantConfig, compute_nodes, fallback_order, layer_sensitivity, quantize_model
from calibration.speed import SpeedResult, SpeedSettings, search_float_prefix

ARTIFACT_KEYS = {"cpu": "int8", "tensorrt": "int8-trt"}
ARTIFACT_FILES = {"cpu": "model.int8.onnx", "tensorrt": "model.int8.trt.onnx"}


@dataclass(frozen=True)
class GateSettings:
    budget: float
    metrics: tuple[str, ...]
    fallback: bool = True
    max_float_nodes: int = 16
    sensitivity_images: int = 32


@dataclass(frozen=True)
class EvalData:
    """The held-out split, preprocessed once: x (N,C,H,W) float32, labels, class names."""

    x: np.ndarray
    y: Sequence[int]
    classes: Sequence[str]
    split: str
    threads: int = 1
    batch_size: int = 16

    def evaluate(self, model: str | Path) -> Metrics:
        return evaluate_onnx(model, self.x, self.y, self.classes, self.split, self.threads, self.batch_size)[0]


@dataclass
class TargetOutcome:
    target: str
    config: QuantConfig
    path: Path
    metrics: Metrics
    gate: GateResult
    float_nodes: list[str] = field(default_factory=list)
    search: dict[str, Any] | None = None
    speed: SpeedResult | None = None

    @property
    def key(self) -> str:
        return ARTIFACT_KEYS[self.target]

    @property
    def file(self) -> str:
        return ARTIFACT_FILES[self.target]

    @property
    def passed(self) -> bool:
        return self.gate.passed

    def report(self) -> dict[str, Any]:
        out = {
            "quantization": self.config.to_dict(),
            "gate": self.gate.to_dict(),
            "float_nodes": self.float_nodes,
            "metrics": self.metrics.to_dict(),
            "passed": self.passed,
        }
        if self.search is not None:
            out["search"] = self.search
        if self.speed is not None:
            out["speed"] = self.speed.to_dict()
        return out

    def quantization_record(self, fingerprint: str, size: int) -> dict[str, Any]:
        """The manifest's ``artifacts.<key>.quantization``."""
        q = {
            **self.config.to_dict(),
            "calibration_fingerprint": fingerprint,
            "calibration_size": size,
            "float_nodes": list(self.float_nodes),
        }
        if self.search is not None:
            # Why layers stay in float: the all-INT8 drop that failed the gate, and the search effort.
            q["fallback"] = {
                "drops_before_points": self.search["drops_before_points"],
                "trials": len(self.search["trials"]),
                "budget_points": self.gate.budget,
            }
        if self.speed is not None:
            # The count to pass as ``--float-prefix N`` to rebuild this artifact byte for byte: an
            # ``auto`` choice is timed, so it can differ on another machine or under load.
            q["float_prefix"] = len(self.speed.float_nodes)
        if self.speed is not None and self.speed.float_nodes:
            # Why leading layers stay in float: they were measured faster in FP32 on the calibrating machine.
            q["float_for_speed"] = {
                "nodes": list(self.speed.float_nodes),
                "measured": self.speed.measured,
                "trials": [{k: t[k] for k in ("prefix", "img_per_s")} for t in self.speed.trials],
            }
        return q


def quantize_and_gate(
    prepared: Path,
    reference: Metrics,
    x_cal: np.ndarray,
    data: EvalData,
    config: QuantConfig,
    ranges: Path,
    out_path: Path,
    settings: GateSettings,
    *,
    log: Callable[[str], None] = print,
    show: Callable[[str, GateResult], None] | None = None,
    speed: SpeedSettings | None = None,
) -> TargetOutcome:
    """Quantize ``prepared`` for ``config.target``, gate it against ``reference``; search float layers if needed.

    ``ranges`` caches the calibration ranges (computed from ``x_cal`` on first use).
    ``speed`` (CPU target only): first choose the leading layers that run faster in float.
    """
    quantize_model(prepared, out_path, config, ranges, x_cal, progress=True)
    fast: SpeedResult | None = None
    if speed is not None and config.target == "cpu":
        fast = search_float_prefix(prepared, config, ranges, x_cal, speed, data.threads, log=log)
        if fast.float_nodes:
            quantize_model(prepared, out_path, config, ranges, nodes_to_exclude=fast.float_nodes)
    base = tuple(fast.float_nodes) if fast else ()
    metrics = data.evaluate(out_path)
    gate = check_gate(reference, metrics, settings.budget, settings.metrics)
    outcome = TargetOutcome(config.target, config, out_path, metrics, gate, float_nodes=list(base), speed=fast)
    if show:
        show(
            f"{outcome.key} ({config.target}) vs fp32 on {data.split} (n={reference.n}), budget "
            f"{settings.budget:g} pts: {'PASSED' if gate.passed else 'FAILED'}",
            gate,
        )
    if gate.passed or not settings.fallback:
        return outcome

    nodes = compute_nodes(prepared)
    sens = layer_sensitivity(
        prepared, config, ranges, x_cal[: settings.sensitivity_images], nodes, data.threads, progress=True
    )
    order = [n for n in fallback_order(prepared, sens) if n not in base]
    trial_path = out_path.with_name(f"trial.{out_path.name}")

    def evaluate(float_nodes: tuple[str, ...]) -> GateResult:
        quantize_model(prepared, trial_path, config, ranges, nodes_to_exclude=base + float_nodes)
        g = check_gate(reference, data.evaluate(trial_path), settings.budget, settings.metrics)
        log(
            f"  float {len(float_nodes)} layer(s): "
            + ", ".join(f"{k} drop {v:+.2f}" for k, v in g.drops.items())
            + (" -> pass" if g.passed else " -> fail")
        )
        return g

    log(f"searching for layers to keep in float (at most {settings.max_float_nodes}) ...")
    search = search_float_nodes(order, evaluate, settings.max_float_nodes)
    outcome.search = {
        **search.to_dict(),
        "sensitivity": {n: round(s, 8) for n, s in sens.items()},
        "drops_before_points": {k: round(v, 4) for k, v in gate.drops.items()},
    }
    if not search.found:
        log(f"no set of up to {settings.max_float_nodes} float layers meets the budget")
        return outcome
    found = search.float_nodes or ()  # search.found: not None here
    quantize_model(prepared, out_path, config, ranges, nodes_to_exclude=base + found)
    outcome.metrics = data.evaluate(out_path)
    outcome.gate = check_gate(reference, outcome.metrics, settings.budget, settings.metrics)
    outcome.float_nodes = list(base + found)
    if show:
        show(
            f"{outcome.key} with {len(outcome.float_nodes)} float layer(s) {outcome.float_nodes}: "
            f"{'PASSED' if outcome.passed else 'FAILED'}",
            outcome.gate,
        )
    return outcome
