"""The accuracy gate: an INT8 model ships only if it loses at most ``budget`` points vs FP32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from calibration.evaluate import Metrics

DEFAULT_BUDGET = 1.0                      # percentage points
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
        return {c: 100.0 * (r - self.candidate.per_class_recall.get(c, 0.0))
                for c, r in self.reference.per_class_recall.items()}

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
            out.append((m, f"{self.reference.value(m):.4f}", f"{self.candidate.value(m):.4f}",
                        f"{self.drop(m):+.2f}", status))
        for c in self.reference.per_class_recall:
            m = f"recall:{c}"
            gated = m in self.metrics
            status = ("FAIL" if m in self.failures else "ok") if gated else "-"
            out.append((m, f"{self.reference.per_class_recall[c]:.4f}",
                        f"{self.candidate.per_class_recall.get(c, 0.0):.4f}", f"{self.drop(m):+.2f}", status))
        return out

    def report(self) -> str:
        """Plain-text report (the CLI renders the same rows with rich)."""
        head = (f"accuracy gate on split '{self.reference.split}' (n={self.reference.n}), budget "
                f"{self.budget:.2f} points on {', '.join(self.metrics)}: {'PASSED' if self.passed else 'FAILED'}")
        lines = [head, f"{'metric':<22}{'fp32':>9}{'int8':>9}{'drop pts':>10}  status"]
        lines += [f"{m:<22}{a:>9}{b:>9}{d:>10}  {s}" for m, a, b, d, s in self.rows()]
        return "\n".join(lines)


def check_gate(reference: Metrics, candidate: Metrics, budget: float = DEFAULT_BUDGET,
               metrics: Sequence[str] = DEFAULT_METRICS) -> GateResult:
    """Compare FP32 (``reference``) and INT8 (``candidate``) metrics of the same split."""
    if reference.split != candidate.split or reference.n != candidate.n:
        raise ValueError(f"gate compares the same split: got {reference.split}/{reference.n} "
                         f"vs {candidate.split}/{candidate.n}")
    if budget < 0:
        raise ValueError(f"gate budget must be >= 0 points, got {budget}")
    for m in metrics:
        reference.value(m)  # raises KeyError naming an unknown metric
    return GateResult(reference, candidate, float(budget), tuple(metrics))
