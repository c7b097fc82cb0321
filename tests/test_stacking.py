"""Layers sharing one input solved as one stacked matrix give the one-by-one answers."""

import pytest
import torch

from layerwise.engine import LayerwiseCompressor
from layerwise.recipe import Recipe, method_config, recipe_from_dict
from layerwise import methods
from layerwise.solvers import GPTQConfig, RTNConfig, gptq, skm, sparsegpt
from layerwise.stacking import stack_runs

from conftest import build_tiny_model
from solvers.test_gptq import correlated_hessian

CONFIGS = [
    {"method": "gptq", "bits": 3, "block_size": 32},  # act-order, static per-block grids, MSE clipping
    {"method": "gptq", "bits": 4, "block_size": 32, "act_order": False},  # grids fitted during the sweep
    {"method": "gptq", "bits": 4, "sym": True},  # per-channel
    {"method": "sparsegpt", "sparsity": 0.5},  # per-layer mask counts, refinement
    {"method": "sparsegpt", "nm": "2:4", "bits": 4, "block_size": 32},
    {"method": "skm", "n_bits": 3, "granularity": "per_grouped_channel", "group_size": 16},
    {"method": "skm", "n_bits": 2, "refit_lut": True},  # one LUT per layer (never across layers)
]
FIELDS = ("codes", "scale", "zero_point", "values", "lut", "mask")


def assert_same(a, b):
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert torch.equal(x, y), field


@pytest.mark.parametrize("raw", CONFIGS, ids=lambda r: " ".join(f"{k}={v}" for k, v in r.items()))
def test_group_solver_equals_one_by_one(raw):
    config = method_config(dict(raw), "test")
    H = correlated_hessian()
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(rows, 128, generator=g) * 0.05 for rows in (64, 32, 32)]
    assert methods.method(raw["method"]).stacks
    stacked = methods.solve_group(config, weights, H)
    for w, sol in zip(weights, stacked):
        alone = {"gptq": gptq, "sparsegpt": sparsegpt, "skm": skm}[raw["method"]](w, H, config)
        assert_same(sol.compressed, alone.compressed)
        assert sol.damping == alone.damping


@pytest.mark.parametrize("raw", [CONFIGS[0], CONFIGS[3], CONFIGS[5]], ids=["gptq", "sparsegpt", "skm"])
def test_stacked_engine_checkpoint_equals_unstacked(raw):
    ids = torch.randint(4, 4096, (8, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for stack in (True, False):
        model = build_tiny_model("llama", dtype=torch.float32)
        recipe = Recipe.single(method_config(dict(raw), "test"))
        results[stack] = LayerwiseCompressor(model, recipe, device="cpu", stack=stack).compress(ids)
    assert results[True].compressed.keys() == results[False].compressed.keys()
    for name, cw in results[True].compressed.items():
        assert_same(cw, results[False].compressed[name])
    assert [r.name for r in results[True].layers] == [r.name for r in results[False].layers]
    assert [r.rel_error for r in results[True].layers] == [r.rel_error for r in results[False].layers]


def test_stack_runs_joins_equal_configs_only():
    plan = {"q": GPTQConfig(bits=4), "k": GPTQConfig(bits=3), "v": GPTQConfig(bits=4), "r": RTNConfig(bits=4),
            "s": RTNConfig(bits=4)}
    assert stack_runs(["q", "k", "v"], plan) == [["q", "v"], ["k"]]
    assert stack_runs(["r", "s"], plan) == [["r"], ["s"]]  # no group solver: data-free RTN is per layer
    assert stack_runs(["q", "v"], plan, enabled=False) == [["q"], ["v"]]


def test_mixed_recipe_stacks_what_it_can():
    """k_proj at other settings than q/v: q and v are stacked, k alone; reports keep block order."""
    ids = torch.randint(4, 4096, (4, 32), generator=torch.Generator().manual_seed(1))
    recipe = recipe_from_dict({"rules": [{"match": r"k_proj", "config": {"method": "gptq", "bits": 3}},
                                         {"match": ".*", "config": {"method": "gptq", "bits": 4}}]}, "test")
    out = {}
    for stack in (True, False):
        model = build_tiny_model("llama", dtype=torch.float32)
        out[stack] = LayerwiseCompressor(model, recipe, device="cpu", stack=stack).compress(ids)
    assert [r.name for r in out[True].layers] == [r.name for r in out[False].layers]
    for name, cw in out[True].compressed.items():
        assert_same(cw, out[False].compressed[name])
