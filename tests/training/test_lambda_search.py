"""``training.lambda_search``: the rules on constructed score tables, and the search restoring the start."""

from __future__ import annotations

import pytest
import torch

from training.lambda_search import GridPoint, PickRule, pick, search

RETAIN = PickRule("retain")


def _grid(*rows: tuple[float, float, float]) -> list[GridPoint]:
    return [GridPoint(lam, old, new) for lam, old, new in rows]


def test_mean_rule_takes_the_best_mean_first_on_ties():
    pts = _grid((0.0, 0.50, 0.70), (1e3, 0.60, 0.60), (1e4, 0.62, 0.60))
    assert pick(pts, PickRule("mean"))[0] == 2
    tie = _grid((0.0, 0.5, 0.5), (1e3, 0.6, 0.4))
    assert pick(tie, PickRule("mean"))[0] == 0


def test_retain_picks_naive_when_naive_does_not_forget():
    # issue 31's table: naive improved the old line and learned the new one best; EWC cost 16.5 points
    pts = _grid((0.0, 0.614, 0.675), (1e4, 0.590, 0.600), (1e5, 0.567, 0.510))
    i, why = pick(pts, RETAIN, old_before=0.559)
    assert pts[i].lam == 0.0 and "best mean" in why


def test_retain_prefers_a_point_that_halves_naive_forgetting():
    # naive forgets 20 points; 1e4 forgets 8 (<= 10) and gives up 2 new points with a better mean;
    # 1e5 forgets 2 but gives up 10 new points (outside the 3-point tolerance)
    pts = _grid((0.0, 0.70, 0.90), (1e3, 0.76, 0.89), (1e4, 0.82, 0.88), (1e5, 0.88, 0.80))
    i, why = pick(pts, RETAIN, old_before=0.90)
    assert pts[i].lam == 1e4 and "naive forgets 20.0 points" in why


def test_retain_excludes_points_outside_the_new_line_tolerance_even_with_a_better_mean():
    # 1e5 has the best mean but loses 5 new points vs naive; 1e4 halves forgetting within 3 points
    pts = _grid((0.0, 0.60, 0.90), (1e4, 0.76, 0.88), (1e5, 0.90, 0.85))
    assert pts[pick(pts, PickRule("mean"))[0]].lam == 1e5
    assert pts[pick(pts, RETAIN, old_before=0.90)[0]].lam == 1e4


def test_retain_falls_back_to_the_best_mean_when_no_point_qualifies():
    pts = _grid((0.0, 0.60, 0.90), (1e4, 0.70, 0.80), (1e5, 0.90, 0.70))
    i, why = pick(pts, RETAIN, old_before=0.90)
    assert pts[i].lam == 1e5 and "no point" in why


def test_retain_without_naive_or_old_score_is_the_mean_rule():
    pts = _grid((1e3, 0.5, 0.9), (1e4, 0.8, 0.7))
    assert pick(pts, RETAIN, old_before=0.9)[0] == 1
    pts0 = _grid((0.0, 0.5, 0.9), (1e4, 0.8, 0.7))
    assert pick(pts0, RETAIN, old_before=None)[0] == 1


def test_rule_and_grid_are_validated():
    with pytest.raises(ValueError, match="lambda rule"):
        PickRule("best")
    with pytest.raises(ValueError, match="no grid points"):
        pick([], RETAIN)


def test_search_trains_each_point_from_the_same_start_and_keeps_the_pick():
    model = torch.nn.Linear(2, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def train_point(lam: float) -> GridPoint:
        seen.append(torch.equal(model.weight, start["weight"]))
        with torch.no_grad():
            model.weight.fill_(lam)
        return GridPoint(lam, old=1.0 - abs(lam - 2.0) / 10, new=0.5)

    res = search(model, [0.0, 2.0, 5.0], train_point, PickRule("mean"), echo=lambda s: None)
    assert seen == [True, True, True] and res.lam == 2.0
    assert torch.all(model.weight == 2.0)
    d = res.to_dict(PickRule("mean"))
    assert [p["lambda"] for p in d["points"]] == [0.0, 2.0, 5.0] and d["chosen"] == 2.0
    res = search(model, [0.0, 2.0], train_point, PickRule("mean"), keep_weights=False, echo=lambda s: None)
    assert torch.equal(model.weight, torch.full_like(model.weight, 2.0))  # the start of this search
    assert res.weights is None
