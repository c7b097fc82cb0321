"""Candidate menus: defaults, a recipe's own menu, and what a menu layer may not do."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from layerwise.budget import default_menu, menu_recipe
from layerwise.budget.menu import layer_menus
from layerwise.errors import RecipeError
from layerwise.recipe import recipe_from_dict


def test_default_menus():
    gptq = default_menu({"method": "gptq", "sym": True})
    assert [(c.bits, c.block_size) for c in gptq] == [(b, s) for b in (2, 3, 4, 8) for s in (None, 128, 32)]
    assert all(c.sym and c.method == "gptq" for c in gptq)
    assert [c.n_bits for c in default_menu({"method": "skm", "granularity": "per_tensor"})] == [2, 3, 4, 6]


def test_menu_drops_candidates_that_do_not_tile_a_layer():
    model = build_tiny_model("llama", dtype=torch.float32, intermediate_size=192)  # down_proj: 192 inputs
    menus = layer_menus(model, menu_recipe({"method": "gptq"}))
    assert len(menus) == 14
    assert {c.block_size for c in menus["model.layers.0.mlp.down_proj"]} == {None, 32}  # 128 ∤ 192
    assert len(menus["model.layers.0.self_attn.q_proj"]) == 8  # 64 inputs: no blocks of 128 either


def test_recipe_menu_round_trip_and_fixed_rules():
    raw = {"rules": [
        {"match": r"mlp\.down_proj", "menu": [{"method": "gptq", "bits": 4, "block_size": 32}, {"method": "gptq", "bits": 8}]},
        {"match": r"layers\.0\.", "config": None},
        {"match": ".*", "config": {"method": "rtn", "bits": 4}},
    ]}
    recipe = recipe_from_dict(raw)
    assert recipe_from_dict(recipe.to_dict()) == recipe
    menus = layer_menus(build_tiny_model("llama", dtype=torch.float32), recipe)
    assert [len(m) for m in menus.values()] == [2] + [1] * 6 + [2]  # layer 0: only its down_proj
    assert menus["model.layers.1.self_attn.q_proj"][0].method == "rtn"


@pytest.mark.parametrize("raw, message", [
    ({"rules": [{"match": ".*", "menu": []}]}, "non-empty list"),
    ({"rules": [{"match": ".*", "menu": [{"method": "gptq", "bits": 3}], "config": None}]}, "'match' and 'menu'"),
    ({"rules": [{"match": ".*", "menu": [{"method": "gptq", "bits": 33}]}]}, "bits=33"),
])
def test_bad_menus_are_errors(raw, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(raw)
