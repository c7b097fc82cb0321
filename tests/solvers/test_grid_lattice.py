"""--grid mlx / gguf: scales on the lattice where every reader's arithmetic gives our weights exactly."""

import pytest
import torch

from layerwise.errors import RecipeError
from layerwise.solvers import GPTQConfig, RTNConfig
from layerwise.solvers.grid import dequantize, fit_grid, quantize, round_scale, scale_significand


def significant_bits(x: torch.Tensor) -> int:
    mantissa, _ = torch.frexp(x.float())
    bits = 0
    while not torch.all(mantissa * 2.0**bits == torch.round(mantissa * 2.0**bits)):
        bits += 1
    return bits


def test_round_scale_rounds_up_onto_the_lattice():
    x = torch.tensor([0.1, 1.0, 3.0, 1 / 3, 2.0**-14, 1000.7])
    for sig in (3, 7, 11):
        r = round_scale(x, sig)
        assert r.dtype == torch.float16 and significant_bits(r) <= sig
        if sig < 11:
            assert torch.all(r.float() >= x) and torch.all(r.float() < x * (1 + 2.0 ** (1 - sig)))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_every_reader_arithmetic_gives_our_weights(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(256, 32) * 0.03
    for grid in ("mlx", "gguf"):
        scale, zero = fit_grid(w, bits, sym, mse_clip=True, grid=grid)
        s, z = scale[:, None], zero[:, None]
        q = quantize(w, s, z, 2**bits - 1)
        ours = dequantize(q, s, z)
        gguf_like = (q.float() - z.float()) * s.float()  # float32, no rounding to float16
        assert torch.equal(gguf_like, ours.float())
        if grid == "mlx":  # float16 product, then float16 sum with the float16 bias −s·z
            bias = (-(s.float() * z.float())).half()
            assert torch.equal(s * q.half() + bias, ours)
    assert scale_significand("mlx", bits, sym) == 11 - bits
    assert scale_significand("gguf", bits, sym) == 11 - bits + sym


def test_default_grid_is_left_out_of_the_recipe_and_others_are_kept():
    assert "grid" not in GPTQConfig(bits=4).to_dict()
    assert RTNConfig(bits=4, grid="gguf").to_dict()["grid"] == "gguf"
    with pytest.raises(RecipeError, match="grid='q8'"):
        RTNConfig(grid="q8")
