"""``--lambda auto``: train from the same start with each EWC strength of a grid, score each on
held-out old-task and new-task validation data, and pick one by a stated rule. Task-agnostic:
the classifier's ``extend`` (accuracy) and the detector's (mAP@.5) both run :func:`search`.

Rules (:class:`PickRule`):

- ``mean``: the best mean of old and new val score (first on ties). The classifier's rule.
- ``retain``: the best mean, unless the naive point (lambda 0, in the grid) forgets more than
  ``forget_tol`` of the old score it started from; then, among the points that forget at most
  ``retain_ratio`` x naive's loss, keep new within ``new_tol`` of naive's and a mean >= naive's,
  the best mean; none such: the best mean. Scores are fractions (0.02 = 2 points of mAP).
  Where EWC buys nothing on the data the best mean is naive itself, so naive is picked.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RULES = ("mean", "retain")


@dataclass
class GridPoint:
    """One lambda's outcome: held-out old/new val scores (None when unmeasured) and task extras."""

    lam: float
    old: float | None
    new: float | None
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able: epochs, seconds, penalty share, ...

    @property
    def mean(self) -> float | None:
        vals = [v for v in (self.old, self.new) if v is not None]
        return sum(vals) / len(vals) if vals else None


@dataclass(frozen=True)
class PickRule:
    kind: str = "mean"  # one of RULES
    forget_tol: float = 0.02  # naive forgetting above which retention is enforced (retain)
    retain_ratio: float = 0.5  # a retaining point forgets at most this x naive's loss
    new_tol: float = 0.03  # ... and gives up at most this much new-task score vs naive

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"lambda rule: expected one of {RULES}, got {self.kind!r}")
        for key in ("forget_tol", "retain_ratio", "new_tol"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"lambda rule {key}: expected a number in [0, 1], got {getattr(self, key)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "forget_tol": self.forget_tol,
            "retain_ratio": self.retain_ratio,
            "new_tol": self.new_tol,
        }


def _best_mean(points: Sequence[GridPoint], among: Sequence[int]) -> int:
    best = among[0]
    for i in among[1:]:
        m, b = points[i].mean, points[best].mean
        if m is not None and (b is None or m > b):
            best = i
    return best


def pick(points: Sequence[GridPoint], rule: PickRule, old_before: float | None = None) -> tuple[int, str]:
    """Index of the chosen point and why. ``old_before``: the old val score before extending."""
    if not points:
        raise ValueError("lambda search: no grid points")
    every = list(range(len(points)))
    best = _best_mean(points, every)
    if rule.kind == "mean":
        return best, "best mean of old and new val score"
    naive = next((i for i, p in enumerate(points) if p.lam == 0.0), None)
    if naive is None or old_before is None or points[naive].old is None:
        return best, "best mean (no naive point or old score to measure forgetting against)"
    n = points[naive]
    assert n.old is not None
    f_naive = old_before - n.old
    if f_naive <= rule.forget_tol:
        return best, f"best mean (naive forgets {100 * f_naive:.1f} points <= {100 * rule.forget_tol:g})"
    ok = [
        i
        for i, p in enumerate(points)
        if p.old is not None
        and old_before - p.old <= rule.retain_ratio * f_naive
        and (p.new is None or n.new is None or p.new >= n.new - rule.new_tol)
        and p.mean is not None
        and n.mean is not None
        and p.mean >= n.mean
    ]
    if not ok:
        return best, (
            f"best mean (naive forgets {100 * f_naive:.1f} points; no point forgets <= {rule.retain_ratio:g}x "
            f"that within {100 * rule.new_tol:g} new points and naive's mean)"
        )
    return _best_mean(points, ok), (
        f"naive forgets {100 * f_naive:.1f} points: best mean among points forgetting <= "
        f"{rule.retain_ratio:g}x naive, new within {100 * rule.new_tol:g} points of naive, mean >= naive's"
    )


@dataclass
class SearchResult:
    points: list[GridPoint]
    chosen: int
    reason: str
    weights: Any | None  # the chosen point's state dict (None: one point, or keep_weights off)
    seconds: float

    @property
    def lam(self) -> float:
        return self.points[self.chosen].lam

    def to_dict(self, rule: PickRule) -> dict[str, Any]:
        return {
            "rule": rule.to_dict(),
            "chosen": self.lam,
            "reason": self.reason,
            "seconds": self.seconds,
            "points": [
                {"lambda": p.lam, "old_val": p.old, "new_val": p.new, "mean": p.mean, **p.extra} for p in self.points
            ],
        }


def search(
    model: Any,
    grid: Sequence[float],
    train_point: Callable[[float], GridPoint],
    rule: PickRule,
    *,
    old_before: float | None = None,
    seed: Callable[[], None] | None = None,
    keep_weights: bool = True,
    echo: Callable[[str], None] = print,
) -> SearchResult:
    """Train ``model`` with each lambda of ``grid`` from the same start (``train_point(lam)`` trains in
    place and scores). ``keep_weights``: leave the chosen point's weights loaded (every point's are held as
    CPU copies until the pick, since a rule may compare all points); else leave the start's loaded (the
    caller retrains at the chosen lambda)."""
    if not grid:
        raise ValueError("lambda search: the grid is empty")
    t0 = time.perf_counter()
    start = copy.deepcopy(model.state_dict()) if len(grid) > 1 or not keep_weights else None
    points: list[GridPoint] = []
    weights: list[Any] = []
    for lam in grid:
        if start is not None:
            model.load_state_dict(start)
        if seed is not None:
            seed()
        points.append(train_point(float(lam)))
        if start is not None and keep_weights:
            weights.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    chosen, reason = pick(points, rule, old_before)
    if start is not None:
        model.load_state_dict(weights[chosen] if keep_weights else start)
    if len(grid) > 1:
        echo(f"lambda auto: picked {points[chosen].lam:g} from {list(grid)} ({reason})")
    kept = weights[chosen] if weights else None
    return SearchResult(points, chosen, reason, kept, time.perf_counter() - t0)


__all__ = ["RULES", "GridPoint", "PickRule", "SearchResult", "pick", "search"]
