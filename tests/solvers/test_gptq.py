import itertools

import pytest
import torch

from layerwise.hessian import HessianAccumulator, output_error
from layerwise.solvers import GPTQConfig, RTNConfig, gptq, gptq_group, rtn
from layerwise.solvers.grid import fit_grid


def correlated_hessian(inp=128, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5
    x = torch.randn(n, inp, generator=g) @ mix + 0.05 * torch.randn(n, inp, generator=g)
    x[:, :8] *= 5  # a few outlier channels, as in real activations
    acc = HessianAccumulator(inp)
    acc.add(x)
    return acc.hessian


SETTINGS = list(itertools.product([2, 3, 4, 8], [None, 32, 64], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("bits,block,sym,act_order,mse_clip", SETTINGS)
def test_gptq_beats_rtn_on_correlated_inputs(bits, block, sym, act_order, mse_clip):
    """Same grid settings on both sides (RTN clipped when GPTQ is)."""
    H = correlated_hessian()
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    g = gptq(W, H, GPTQConfig(bits=bits, block_size=block, sym=sym, act_order=act_order, mse_clip=mse_clip)).compressed
    r = rtn(W, None, RTNConfig(bits=bits, block_size=block, sym=sym, mse_clip=mse_clip)).compressed
    assert output_error(W, g.dequantize(), H) < output_error(W, r.dequantize(), H)


def test_mse_clip_lowers_rtn_weight_error():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    plain = rtn(W, None, RTNConfig(bits=3, mse_clip=False)).compressed.dequantize().float()
    clipped = rtn(W, None, RTNConfig(bits=3, mse_clip=True)).compressed.dequantize().float()
    assert ((clipped - W) ** 2).sum() < ((plain - W) ** 2).sum()


def test_act_order_static_groups_keep_blocks_contiguous():
    """Scales of an act-order run are exactly the grid of each contiguous block of the original W."""
    H = correlated_hessian()
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    for mse_clip in (False, True):
        cw = gptq(W, H, GPTQConfig(bits=4, block_size=32, act_order=True, mse_clip=mse_clip)).compressed
        scale, zero = fit_grid(W.reshape(32 * 4, 32), 4, sym=False, mse_clip=mse_clip)
        assert torch.equal(cw.scale, scale.reshape(32, 4)) and torch.equal(cw.zero_point, zero.reshape(32, 4))
        assert cw.block_size == 32


def test_dead_columns_give_zero_weights():
    H = correlated_hessian()
    H[5, :] = 0
    H[:, 5] = 0
    W = torch.randn(16, 128) * 0.05
    sol = gptq(W, H, GPTQConfig(bits=4, block_size=32))
    assert (sol.compressed.dequantize()[:, 5] == 0).all()
    assert torch.isfinite(sol.compressed.dequantize().float()).all()


def test_gptq_is_deterministic():
    H = correlated_hessian()
    W = torch.randn(16, 128) * 0.05
    a = gptq(W, H, GPTQConfig(bits=3, block_size=32, act_order=True)).compressed
    b = gptq(W, H, GPTQConfig(bits=3, block_size=32, act_order=True)).compressed
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def _exhaustive_clip(w, bits, sym):
    """GPTQ's reference search: every shrink factor 1.00 … 0.20, the first best one per row."""
    from layerwise.solvers.grid import _grid_from_range, dequantize, quantize

    maxq = 2**bits - 1
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    best, pick = None, None
    for i in range(81):
        s, z = _grid_from_range(lo * (1 - i / 100), hi * (1 - i / 100), maxq, sym)
        err = ((dequantize(quantize(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None]).float() - w).abs() ** 2.4).sum(1)
        if best is None:
            best, pick = err, (s, z)
        else:
            better = err < best
            best = torch.where(better, err, best)
            pick = (torch.where(better, s, pick[0]), torch.where(better, z, pick[1]))
    return pick, best


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False)])
def test_coarse_to_fine_clipping_matches_the_exhaustive_search(bits, sym):
    from layerwise.solvers.grid import dequantize, quantize

    g = torch.Generator().manual_seed(5)
    w = torch.randn(2048, 32, generator=g) * 0.02
    w[:, :2] *= 6  # outliers: the clipping has something to clip
    (s_ref, z_ref), err_ref = _exhaustive_clip(w, bits, sym)
    s, z = fit_grid(w, bits, sym, mse_clip=True)
    maxq = 2**bits - 1
    err = ((dequantize(quantize(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None]).float() - w).abs() ** 2.4).sum(1)
    same = (s == s_ref) & (z == z_ref)
    assert same.float().mean() >= 0.97
    assert torch.equal(err[same], err_ref[same])
    assert err.sum() <= err_ref.sum() * 1.001


@pytest.mark.parametrize("act_order,block", [(False, 32), (True, 32), (False, None)])
def test_consumed_hessian_same_codes_and_report_without_it(act_order, block):
    """consume_hessian=True factors H in the caller's buffer: the same bytes as leaving it intact.
    The report then needs no H: the sweep's scaled errors E satisfy W₀ − Q = E U with
    H_d⁻¹ = UᵀU, so Σ eᵢ² per row is (ΔW H_d ΔWᵀ)ⱼⱼ; minus the damping's and the dead columns'
    share it is the undamped figure `relative_error` measures. Equal to it within rel 1e-4: the
    identity is exact in exact arithmetic, the sweep carries its updates in float32 (measured here:
    below 1e-6 per row)."""
    from layerwise.hessian import relative_error, relative_error_of_rows, report_denominator

    g = torch.Generator().manual_seed(4)
    inp = 640  # wider than one 512-row tile of the in-place copies
    x = torch.randn(3000, inp, generator=g) @ (torch.randn(inp, inp, generator=g) / inp**0.5)
    x[:, 7] = 0  # a dead column
    acc = HessianAccumulator(inp)
    acc.add(x)
    H = acc.hessian
    weights = [torch.randn(96, inp, generator=g).half() * 0.05, torch.randn(600, inp, generator=g).half() * 0.05]
    config = GPTQConfig(bits=3, block_size=block, act_order=act_order, damp=0.1)  # damping: a large share of Σ e²
    kept = gptq_group(weights, H.clone(), config)
    buffer = H.clone()
    consumed = gptq_group(weights, buffer, config, consume_hessian=True)
    assert buffer.numel() == 0  # it held U, then was emptied
    for a, b, w in zip(kept, consumed, weights):
        for field in ("codes", "scale", "zero_point"):
            assert torch.equal(getattr(a.compressed, field), getattr(b.compressed, field))
        assert torch.equal(a.row_errors, b.row_errors)
        exact = relative_error(w.float(), b.compressed.dequantize().float(), H)  # 512 of the 600 rows
        assert relative_error_of_rows(b.row_errors, report_denominator(w, H)) == pytest.approx(exact, rel=1e-4)
        full = ((b.compressed.dequantize().double() - w.double()) @ H.double() * (b.compressed.dequantize().double() - w.double())).sum(1)
        assert torch.allclose(b.row_errors, full, rtol=1e-4, atol=1e-6 * float(full.max()))
