"""Fisher sensitivity through the Python API and its use by SKM in the engine."""

import pytest
import torch

from layerwise.engine import LayerwiseCompressor
from layerwise.errors import RecipeError
from layerwise.recipe import recipe_from_dict
from layerwise.sensitivity import fisher_sensitivity, next_token_loss

from conftest import build_tiny_model

IDS = torch.randint(4, 4096, (4, 32), generator=torch.Generator().manual_seed(0))
BATCHES = [IDS[:2], IDS[2:]]


def skm_recipe(sensitivity):
    return recipe_from_dict({"rules": [{"match": ".*", "config": {
        "method": "skm", "n_bits": 2, "granularity": "per_grouped_channel", "group_size": 16,
        "sensitivity": sensitivity, "error_feedback": False}}]})


def test_fisher_is_the_sum_of_squared_gradients():
    model = build_tiny_model("llama", dtype=torch.float32)
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen parameter stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    fisher = fisher_sensitivity(model, next_token_loss, BATCHES)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert len(fisher) == 2 * 7
    name = "model.layers.1.mlp.down_proj"
    expected = torch.zeros_like(fisher[name])
    weight = model.get_submodule(name).weight
    for batch in BATCHES:
        weight.requires_grad_(True)
        (grad,) = torch.autograd.grad(next_token_loss(model, batch), weight)
        expected += grad**2
    torch.testing.assert_close(fisher[name], expected, rtol=1e-5, atol=1e-12)


def test_skm_uses_the_fisher_sensitivity():
    fisher = fisher_sensitivity(build_tiny_model("llama", dtype=torch.float32), next_token_loss, BATCHES)
    luts = {}
    for kind in ("hessian_diag", "fisher"):
        model = build_tiny_model("llama", dtype=torch.float32)
        compressor = LayerwiseCompressor(model, skm_recipe(kind), device="cpu",
                                         sensitivity=fisher if kind == "fisher" else None)
        luts[kind] = compressor.compress(IDS).compressed
    original = build_tiny_model("llama", dtype=torch.float32)
    weighted_error = {}
    for kind, compressed in luts.items():
        weighted_error[kind] = sum(
            float((fisher[n] * (cw.dequantize().float() - original.get_submodule(n).weight) ** 2).sum())
            for n, cw in compressed.items()
        )
    # weighting the k-means by the Fisher lowers the Fisher-weighted error it is meant to lower
    assert weighted_error["fisher"] < weighted_error["hessian_diag"], weighted_error
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(luts["fisher"][name].lut, luts["hessian_diag"][name].lut)


def test_fisher_recipe_without_sensitivities_is_a_clear_error():
    model = build_tiny_model("llama", dtype=torch.float32)
    with pytest.raises(RecipeError, match="sensitivity: fisher needs per-weight sensitivities"):
        LayerwiseCompressor(model, skm_recipe("fisher"), device="cpu")
