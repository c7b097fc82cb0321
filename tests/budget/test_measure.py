"""The measuring pass's shortcuts give the one-by-one answers: every candidate of layers sharing a
Hessian, solved with one factored H⁻¹ per damping and act-order and stacked across layers, is bit
for bit what each solver computes alone."""

from __future__ import annotations

import torch

from layerwise.budget.measure import solve_menus
from layerwise.recipe import method_config
from layerwise import methods
from layerwise.solvers.base import prepare_for

from solvers.test_gptq import correlated_hessian
from test_stacking import assert_same

# two dampings × act-order on/off, SKM sharing GPTQ's natural-order factorization, data-free methods
SHARED = [
    {"method": "gptq", "bits": 3, "block_size": 32},
    {"method": "gptq", "bits": 2},
    {"method": "gptq", "bits": 4, "block_size": 32, "act_order": False},
    {"method": "gptq", "bits": 3, "damp": 0.1},
    {"method": "skm", "n_bits": 3, "granularity": "per_grouped_channel", "group_size": 16},
    {"method": "skm", "n_bits": 2, "error_feedback": False},
    {"method": "rtn", "bits": 3, "block_size": 32},
    {"method": "kmeans", "n_bits": 2},
]


def test_shared_factorization_gives_the_one_by_one_answers():
    H = correlated_hessian()
    H[5, :] = H[:, 5] = 0  # a dead input: zeroed weights, H_ii = 1 in every factorization
    g = torch.Generator().manual_seed(7)
    weights = {name: torch.randn(rows, 128, generator=g) * 0.05 for name, rows in (("q", 64), ("k", 32), ("v", 32))}
    configs = [method_config(dict(raw), "test") for raw in SHARED]
    # q has every candidate, k a subset in another order (stacked where common), v one of its own
    menus = {"q": tuple(configs), "k": (configs[3], configs[0], configs[4]), "v": (configs[2],)}
    solved = solve_menus(weights, H, menus)
    for name, menu in menus.items():
        assert len(solved[name]) == len(menu)
        for config, cw in zip(menu, solved[name]):
            assert_same(cw, methods.solve_group(config, [weights[name]], H)[0].compressed)


def test_configs_that_share_a_preparation_share_its_factor():
    """The key is exactly what the factorization depends on: equal keys, equal factors."""
    H = correlated_hessian()
    a = method_config({"method": "gptq", "bits": 2}, "test")
    b = method_config({"method": "gptq", "bits": 8, "block_size": 32}, "test")
    c = method_config({"method": "skm", "n_bits": 4}, "test")
    d = method_config({"method": "gptq", "bits": 4, "act_order": False}, "test")
    assert a.hessian_preparation() == b.hessian_preparation() != c.hessian_preparation() == d.hessian_preparation()
    assert torch.equal(prepare_for(H, a).cholesky_of_inverse, prepare_for(H, b).cholesky_of_inverse)
    assert torch.equal(prepare_for(H, c).cholesky_of_inverse, prepare_for(H, d).cholesky_of_inverse)
    assert not torch.equal(prepare_for(H, a).cholesky_of_inverse, prepare_for(H, c).cholesky_of_inverse)
