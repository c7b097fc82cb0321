"""The multiple-choice knapsack is exact: it matches brute force and never exceeds the budget."""

from __future__ import annotations

import itertools
import random

import pytest

from layerwise.budget.knapsack import choose
from layerwise.errors import RecipeError


def brute_force(costs, losses, budget):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[k] for c, k in zip(costs, pick))
        loss = sum(lo[k] for lo, k in zip(losses, pick))
        if cost <= budget and (best is None or loss < best[0] - 1e-12):
            best = (loss, pick)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = rng.randint(2, 5)
    costs = [[rng.randint(10, 400) for _ in range(rng.randint(1, 4))] for _ in range(layers)]
    losses = [[rng.random() for _ in c] for c in costs]
    budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    pick = choose(costs, losses, budget)
    loss = sum(lo[k] for lo, k in zip(losses, pick))
    assert sum(c[k] for c, k in zip(costs, pick)) <= budget
    assert loss == pytest.approx(brute_force(costs, losses, budget)[0], abs=1e-12)


def test_coarse_units_still_fit_the_real_budget():
    """Costs are rounded up to units of ~1000 bytes: the coarse answer still fits in bytes, the fine
    one is the optimum (two layers at 1000 bytes)."""
    costs = [[0, 1000, 2000]] * 3
    losses = [[3.0, 1.0, 0.0]] * 3
    coarse = choose(costs, losses, budget=2999, resolution=3)
    assert sum(costs[0][k] for k in coarse) <= 2999
    assert sorted(choose(costs, losses, budget=2999)) == [0, 1, 1]


def test_budget_below_the_cheapest_options_is_an_error():
    with pytest.raises(RecipeError, match="raise the target"):
        choose([[100, 200], [100]], [[1.0, 0.0], [0.0]], budget=150)
