"""The accuracy gate: an INT8 model ships only if it loses at most ``budget`` points vs FP32.

Per-backend gates (``--gate-backends``) score the artifacts through each engine the station
may pick (ONNX Runtime, OpenVINO at f32 / bf16) against the same FP32 reference; the bundle's
manifest records them and the runtime's ``auto`` refuses an engine whose record failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration.evaluate import Metrics
from runtime.engine.gate import DEFAULT_BUDGET_POINTS

DEFAULT_BUDGET = DEFAULT_BUDGET_POINTS  # percentage points: the one definition, shared with stations
DEFAULT_METRICS = ("accuracy", "macro_f1")


@dataclass(frozen=True)
class GateResult:
    """FP32 vs INT8 on one split. Drops are in percentage points (positive = INT8 worse)."""

    reference: Metrics
    candidate: Metrics
    budget: float
    metrics: tuple[str, ...]

    def drop(self, metric: str) -> float:
        return 100.0 * (self.reference.value(metric) - self.candidate.value(metric))

    @property
    def drops(self) -> dict[str, float]:
        return {m: self.drop(m) for m in self.metrics}

    @property
    def failures(self) -> list[str]:
        # A hair of slack so a drop that is exactly the budget (e.g. 1 image in 100) passes.
        return [m for m in self.metrics if self.drop(m) > self.budget + 1e-9]

    @property
    def passed(self) -> bool:
        return not self.failures

    def recall_drops(self) -> dict[str, float]:
        return {
            c: 100.0 * (r - self.candidate.per_class_recall.get(c, 0.0))
            for c, r in self.reference.per_class_recall.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "budget_points": self.budget,
            "metrics": list(self.metrics),
            "drops_points": {k: round(v, 4) for k, v in self.drops.items()},
            "recall_drops_points": {k: round(v, 4) for k, v in self.recall_drops().items()},
            "failed": self.failures,
            "split": self.reference.split,
            "n": self.reference.n,
        }

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(metric, fp32, int8, drop, status) rows for a table; per-class recall rows are informative."""
        out = []
        for m in ("accuracy", "macro_f1"):
            gated = m in self.metrics
            status = ("FAIL" if m in self.failures else "ok") if gated else "-"
            out.append(
                (m, f"{self.reference.value(m):.4f}", f"{self.candidate.value(m):.4f}", f"{self.drop(m):+.2f}", status)
            )
        for c in self.reference.per_class_recall:
            m = f"recall:{c}"
            gated = m in self.metrics
            status = ("FAIL" if m in self.failures else "ok") if gated else "-"
            out.append(
                (
                    m,
                    f"{self.reference.per_class_recall[c]:.4f}",
                    f"{self.candidate.per_class_recall.get(c, 0.0):.4f}",
                    f"{self.drop(m):+.2f}",
                    status,
                )
            )
        return out

    def report(self) -> str:
        """Plain-text report (the CLI renders the same rows with rich)."""
        head = (
            f"accuracy gate on split '{self.reference.split}' (n={self.reference.n}), budget "
            f"{self.budget:.2f} points on {', '.join(self.metrics)}: {'PASSED' if self.passed else 'FAILED'}"
        )
        lines = [head, f"{'metric':<22}{'fp32':>9}{'int8':>9}{'drop pts':>10}  status"]
        lines += [f"{m:<22}{a:>9}{b:>9}{d:>10}  {s}" for m, a, b, d, s in self.rows()]
        return "\n".join(lines)


def check_gate(
    reference: Metrics, candidate: Metrics, budget: float = DEFAULT_BUDGET, metrics: Sequence[str] = DEFAULT_METRICS
) -> GateResult:
    """Compare FP32 (``reference``) and INT8 (``candidate``) metrics of the same split."""
    if reference.split != candidate.split or reference.n != candidate.n:
        raise ValueError(
            f"gate compares the same split: got {reference.split}/{reference.n} vs {candidate.split}/{candidate.n}"
        )
    if budget < 0:
        raise ValueError(f"gate budget must be >= 0 points, got {budget}")
    for m in metrics:
        reference.value(m)  # raises KeyError naming an unknown metric
    return GateResult(reference, candidate, float(budget), tuple(metrics))


# ---- per-backend gates (calibrate --gate-backends) ------------------------------------------------
# The same artifact can score differently per engine: OpenVINO may run the float parts in bf16.
# Each record id names the engine and inference precision exactly as runtime/inference/selection.py looks it up
# (Backend.accuracy_id); ``auto`` refuses an (artifact, backend) whose record failed.
GATE_BACKENDS = ("onnxruntime", "openvino")
DEFAULT_GATE_BACKENDS = "onnxruntime"
OPENVINO_PRECISIONS = ("f32", "bf16")


def parse_gate_backends(text: str) -> tuple[str, ...]:
    """'onnxruntime,openvino' -> record ids. 'openvino' means every precision this CPU runs
    (f32, and bf16 where the CPU has it); 'openvino:f32' / 'openvino:bf16' name one."""
    ids: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        name, _, precision = item.partition(":")
        if name not in GATE_BACKENDS or (precision and (name != "openvino" or precision not in OPENVINO_PRECISIONS)):
            raise ValueError(
                f"--gate-backends: unknown backend {item!r}; expected a comma-separated list of "
                f"{', '.join(GATE_BACKENDS)} (openvino optionally as openvino:f32 or openvino:bf16)"
            )
        if name == "openvino" and not precision:
            ids += [f"openvino:{p}" for p in openvino_precisions()]
        else:
            ids.append(item)
    return tuple(dict.fromkeys(ids))


def gate_backends_arg(text: str) -> tuple[str, ...]:
    """argparse ``type=`` for --gate-backends (the message of a bad list reaches the user)."""
    import argparse

    try:
        return parse_gate_backends(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def openvino_precisions() -> tuple[str, ...]:
    """The inference precisions OpenVINO's CPU plugin can run here (ValueError without openvino)."""
    try:
        import openvino as ov
    except ImportError:
        raise ValueError("--gate-backends openvino needs openvino (pip install 'defectscope[openvino]')") from None
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ("f32", "bf16") if "BF16" in caps else ("f32",)


def backend_metrics(backend_id: str, model: str | Any, output: str, data: Any) -> tuple[Metrics, dict[str, Any]]:
    """(metrics, facts) of an ONNX classifier through one engine; ``data`` is a pipeline.EvalData."""
    from calibration.evaluate import prediction_metrics

    if backend_id == "onnxruntime":
        import onnxruntime

        return data.evaluate(model), {"onnxruntime": onnxruntime.__version__, "inference_precision": "f32"}
    from runtime.inference.openvino import OpenVINOModel

    engine = OpenVINOModel(model, [output], threads=data.threads, precision=backend_id.partition(":")[2])
    try:
        logits = [engine.run(data.x[i : i + data.batch_size])[0] for i in range(0, len(data.x), data.batch_size)]
    finally:
        engine.close()
    preds = np.concatenate(logits).argmax(1)
    return (
        prediction_metrics(data.y, preds, data.classes, data.split),
        {"openvino": engine.version, "inference_precision": engine.inference_precision},
    )


def gate_backends(
    ids: Sequence[str],
    models: Mapping[str, Any],
    reference: Metrics,
    data: Any,
    output: str,
    budget: float = DEFAULT_BUDGET,
    metrics: Sequence[str] = DEFAULT_METRICS,
    known: Mapping[str, Metrics] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{artifact key: {record id: metrics + engine facts + gate vs ``reference``}} for each model path.

    ``known`` holds ONNX Runtime metrics already computed per artifact key (not evaluated again).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, path in models.items():
        out[key] = {}
        for rid in ids:
            if rid == "onnxruntime" and known and key in known:
                import onnxruntime

                m, facts = known[key], {"onnxruntime": onnxruntime.__version__, "inference_precision": "f32"}
            else:
                m, facts = backend_metrics(rid, path, output, data)
            if facts["inference_precision"] != rid.partition(":")[2] and rid != "onnxruntime":
                rid = f"openvino:{facts['inference_precision']}"  # the plugin ran another precision
            out[key][rid] = {**m.to_dict(), **facts, "gate": check_gate(reference, m, budget, metrics).to_dict()}
    return out


def backend_rows(records: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[tuple[str, ...]]:
    """(artifact, backend, accuracy, macro_f1, drop pts, status) rows for the calibrate report."""
    rows: list[tuple[str, ...]] = []
    for key, per in records.items():
        for rid, r in per.items():
            g = r["gate"]
            worst = max(g["drops_points"].values(), default=0.0)
            rows.append(
                (
                    key,
                    rid,
                    f"{r['accuracy']:.4f}",
                    f"{r['macro_f1']:.4f}",
                    f"{worst:+.2f}",
                    "ok" if g["passed"] else "FAIL",
                )
            )
    return rows
