"""Search for the smallest set of nodes to keep in float so the accuracy gate passes.

Candidates come ranked (stem conv, classifier, then layers by per-layer
sensitivity). The search grows a prefix of that ranking geometrically until the
gate passes, bisects down to the shortest passing prefix, then drops every node
of that prefix whose removal still passes (backward elimination), so the result
is a set from which no single node can be removed. Each tried set is evaluated
once (memoised).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibration.gate import GateResult


@dataclass(frozen=True)
class Trial:
    float_nodes: tuple[str, ...]
    passed: bool
    drops: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_nodes": list(self.float_nodes),
            "passed": self.passed,
            "drops_points": {k: round(v, 4) for k, v in self.drops.items()},
        }


@dataclass
class SearchResult:
    float_nodes: tuple[str, ...] | None  # None: no set within max_nodes passed
    gate: GateResult | None  # the gate of the chosen set
    trials: list[Trial] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.float_nodes is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "float_nodes": list(self.float_nodes or []),
            "candidates_ranked": self.order,
            "trials": [t.to_dict() for t in self.trials],
        }


def _prefix_sizes(limit: int) -> list[int]:
    sizes, k = [], 1
    while k < limit:
        sizes.append(k)
        k = k + 1 if k < 4 else int(k * 1.5)
    sizes.append(limit)
    return sorted(set(sizes))


def search_float_nodes(
    order: Sequence[str], evaluate: Callable[[tuple[str, ...]], GateResult], max_nodes: int
) -> SearchResult:
    """Find a small passing set of float nodes among ``order`` (best candidates first).

    ``evaluate(nodes)`` quantizes with ``nodes`` kept in float and returns the gate.
    """
    order = list(dict.fromkeys(order))
    result = SearchResult(float_nodes=None, gate=None, order=order)
    memo: dict[frozenset[str], GateResult] = {}

    def run(nodes: Sequence[str]) -> GateResult:
        key = frozenset(nodes)
        if key not in memo:
            gate = evaluate(tuple(nodes))
            memo[key] = gate
            result.trials.append(Trial(tuple(nodes), gate.passed, gate.drops))
        return memo[key]

    limit = min(max_nodes, len(order))
    if limit < 1:
        return result
    lo, hi = 0, None  # prefix lengths: lo known failing (0 = all quantized), hi first known passing
    for k in _prefix_sizes(limit):
        if run(order[:k]).passed:
            hi = k
            break
        lo = k
    if hi is None:
        return result
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(order[:mid]).passed:
            hi = mid
        else:
            lo = mid
    chosen = list(order[:hi])
    # Least important first: drop any node the gate does not need.
    for node in reversed(list(chosen)):
        if len(chosen) == 1:
            break
        trial = [n for n in chosen if n != node]
        if run(trial).passed:
            chosen = trial
    result.float_nodes = tuple(chosen)
    result.gate = run(chosen)
    return result
