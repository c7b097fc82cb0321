"""Palettization: plain k-means and sensitive k-means (SKM) with GPTQ-style error feedback."""

from __future__ import annotations

import pytest
import torch

from layerwise.errors import RecipeError
from layerwise.formats import CompressedWeight
from layerwise.hessian import HessianAccumulator, output_error
from layerwise.solvers.kmeans import weighted_kmeans
from layerwise.solvers.palettize import kmeans, skm
from layerwise.solvers.palettize_config import KMeansConfig, SKMConfig


def correlated_layer(out_f=128, in_f=64, n=2048, seed=0, column_scale=None):
    """weight [out, in] and H = 2/N XᵀX with X = randn @ A (strongly correlated inputs)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + 0.3 * torch.eye(in_f)
    X = torch.randn(n, in_f, generator=g) @ A
    if column_scale is not None:
        X = X * column_scale
    acc = HessianAccumulator(in_f)
    acc.add(X)
    return torch.randn(out_f, in_f, generator=g) * 0.02, acc.hessian


def grouped(bits, group_size=16, **kw):
    return dict(n_bits=bits, granularity="per_grouped_channel", group_size=group_size, **kw)


def assert_palettized(cw: CompressedWeight, bits: int):
    """Every group's dequantized values are entries of its own LUT (so at most 2**bits of them)."""
    assert cw.scheme == "lut" and cw.bits == bits
    assert cw.codes.dtype == torch.uint8 and int(cw.codes.max()) < 2**bits
    assert cw.lut.dtype == torch.float16 and cw.lut.shape[1:] == (1, 2**bits)
    dense = cw.dequantize()
    g_out = cw.lut_group[0]
    for g in range(cw.lut.shape[0]):
        rows = dense[g * g_out : (g + 1) * g_out]
        kept = rows if cw.mask is None else rows[cw.mask[g * g_out : (g + 1) * g_out]]
        values = torch.unique(kept.float())
        assert values.numel() <= 2**bits
        assert torch.isin(values, cw.lut[g, 0].float()).all()


# ---- the palette ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_every_group_uses_only_its_lut(bits):
    W, H = correlated_layer()
    for solve, config in [(skm, SKMConfig(**grouped(bits))), (kmeans, KMeansConfig(**grouped(bits)))]:
        cw = solve(W, H, config).compressed
        assert cw.lut.shape == (128 // 16, 1, 2**bits)
        assert_palettized(cw, bits)


def test_per_tensor_is_one_lut():
    W, H = correlated_layer()
    cw = skm(W, H, SKMConfig(n_bits=4)).compressed
    assert cw.lut.shape == (1, 1, 16) and cw.lut_group == (128, 64)
    assert_palettized(cw, 4)


def test_error_falls_with_bits():
    W, H = correlated_layer()
    errs = [
        output_error(W, skm(W, H, SKMConfig(**grouped(b))).compressed.dequantize(), H)
        for b in (1, 2, 3, 4, 6, 8)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 * errs[0]


@pytest.mark.parametrize("error_feedback", [True, False])
def test_few_distinct_values_reproduce_exactly(error_feedback):
    g = torch.Generator().manual_seed(1)
    levels = torch.tensor([-0.5, -0.125, 0.0, 0.0625, 0.75])  # 5 values, float16-exact, < 2**3
    W = levels[torch.randint(0, 5, (64, 32), generator=g)]
    _, H = correlated_layer(64, 32)
    for cw in [
        skm(W, H, SKMConfig(**grouped(3), error_feedback=error_feedback)).compressed,
        kmeans(W, None, KMeansConfig(n_bits=3)).compressed,
    ]:
        assert torch.equal(cw.dequantize().float(), W)


def test_sensitivity_weighting_helps_the_sensitive_columns():
    # inputs 1000x larger on the last columns, whose weights are smaller (as for activation
    # outlier channels): plain k-means spends its entries on the large, insensitive weights
    scale = torch.logspace(-1.5, 1.5, 64)
    W, H = correlated_layer(column_scale=scale)
    diag = torch.diag(H)

    def weighted_err(cw):
        return float((diag * (cw.dequantize().float() - W) ** 2).sum())

    for weight in (W, W / scale.sqrt()):
        W = weight
        plain = weighted_err(kmeans(W, None, KMeansConfig(**grouped(3))).compressed)
        sensitive = weighted_err(skm(W, H, SKMConfig(**grouped(3), error_feedback=False)).compressed)
        assert sensitive < 0.95 * plain
    assert sensitive < 0.2 * plain


def test_error_feedback_lowers_output_error():
    W, H = correlated_layer()
    for bits in (2, 4):
        without = skm(W, H, SKMConfig(**grouped(bits), error_feedback=False)).compressed.dequantize()
        with_fb = skm(W, H, SKMConfig(**grouped(bits))).compressed.dequantize()
        assert output_error(W, with_fb, H) < 0.8 * output_error(W, without, H)


def test_refit_lut_does_not_hurt():
    W, H = correlated_layer()
    base = output_error(W, skm(W, H, SKMConfig(**grouped(3))).compressed.dequantize(), H)
    refit = output_error(W, skm(W, H, SKMConfig(**grouped(3), refit_lut=True)).compressed.dequantize(), H)
    assert refit <= base * 1.001


def test_fisher_sensitivity_is_used():
    W, H = correlated_layer()
    fisher = torch.where(W.abs() < 0.01, 1.0, 1e-3)  # the small weights matter most
    with pytest.raises(RecipeError, match="sensitivity"):
        skm(W, H, SKMConfig(**grouped(3), sensitivity="fisher"))
    with pytest.raises(RecipeError, match="sensitivity"):
        skm(W, H, SKMConfig(**grouped(3)), sensitivity=fisher)

    def fisher_err(cw):
        return float((fisher * (cw.dequantize().float() - W) ** 2).sum())

    cfg = dict(**grouped(3), error_feedback=False)
    by_fisher = skm(W, H, SKMConfig(**cfg, sensitivity="fisher"), sensitivity=fisher).compressed
    by_hessian = skm(W, H, SKMConfig(**cfg)).compressed
    assert fisher_err(by_fisher) < 0.3 * fisher_err(by_hessian)
    # without error feedback, fisher needs no Hessian at all
    alone = skm(W, None, SKMConfig(**cfg, sensitivity="fisher"), sensitivity=fisher).compressed
    assert torch.equal(alone.dequantize(), by_fisher.dequantize())


def test_dead_columns():
    W, H = correlated_layer()
    H[:, 5] = 0
    H[5, :] = 0
    sol = skm(W, H, SKMConfig(**grouped(4)))
    assert torch.isfinite(sol.compressed.dequantize().float()).all()
    assert sol.damping == pytest.approx(0.01)


# ---- determinism and serialization ------------------------------------------------------------


def test_same_seed_is_bit_identical():
    W, H = correlated_layer()
    a = skm(W, H, SKMConfig(**grouped(4), seed=7)).compressed
    b = skm(W, H, SKMConfig(**grouped(4), seed=7)).compressed
    assert torch.equal(a.codes, b.codes) and torch.equal(a.lut, b.lut)
    c = kmeans(W, None, KMeansConfig(n_bits=4, seed=7)).compressed
    d = kmeans(W, None, KMeansConfig(n_bits=4, seed=7)).compressed
    assert torch.equal(c.codes, d.codes) and torch.equal(c.lut, d.lut)
    # another seed is allowed to land elsewhere but must be as valid
    assert_palettized(skm(W, H, SKMConfig(**grouped(4), seed=8)).compressed, 4)


def _roundtrip(cw: CompressedWeight) -> CompressedWeight:
    back = CompressedWeight.from_tensors(cw.meta(), cw.to_tensors())
    assert torch.equal(back.dequantize(), cw.dequantize())
    for name in ("codes", "lut", "lut_codes", "lut_scale", "mask"):
        mine, theirs = getattr(cw, name), getattr(back, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    return back


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(lut_dtype="int8"), dict(sparsity=0.5), dict(sparsity=0.5, lut_dtype="int8")],
    ids=["float16", "int8", "sparse", "sparse-int8"],
)
def test_roundtrip_bit_exact(extra):
    W, H = correlated_layer()
    for bits in (3, 4):
        _roundtrip(skm(W, H, SKMConfig(**grouped(bits), **extra)).compressed)


@pytest.mark.parametrize("lut_dtype", ["int8", "uint8"])
def test_quantized_lut_is_exactly_codes_times_scale(lut_dtype):
    W, H = correlated_layer()
    if lut_dtype == "uint8":
        W = W.abs()  # without a LUT offset, uint8 holds one-signed LUTs only
    cw = skm(W, H, SKMConfig(**grouped(4), lut_dtype=lut_dtype)).compressed
    assert cw.lut_codes.dtype == getattr(torch, lut_dtype) and cw.lut_codes.shape == cw.lut.shape
    assert cw.lut_scale.dtype == torch.float16 and cw.lut_scale.shape == (8, 1, 1)
    assert torch.equal(cw.lut, (cw.lut_codes.float() * cw.lut_scale.float()).to(torch.float16))
    assert_palettized(cw, 4)
    # the quantized LUT costs a little accuracy, not a lot
    fp16 = skm(W, H, SKMConfig(**grouped(4))).compressed
    assert output_error(W, cw.dequantize(), H) < 1.5 * output_error(W, fp16.dequantize(), H)


def test_uint8_lut_rejects_mixed_signs():
    W, H = correlated_layer()
    with pytest.raises(RecipeError, match="lut_dtype"):
        skm(W, H, SKMConfig(**grouped(4), lut_dtype="uint8"))


# ---- joint sparsity ---------------------------------------------------------------------------


def test_sparse_palettization_keeps_mask_and_zeros():
    W, H = correlated_layer()
    cw = skm(W, H, SKMConfig(**grouped(3), sparsity=0.5)).compressed
    assert cw.mask is not None and cw.kept == W.numel() // 2
    assert (cw.mask.sum(dim=1) == 32).all()  # magnitude fallback: per row
    dense = cw.dequantize()
    assert (dense[~cw.mask] == 0).all() and (cw.codes[~cw.mask] == 0).all()
    assert_palettized(cw, 3)


def test_given_mask_is_used():
    W, H = correlated_layer()
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(W.shape, generator=g) > 0.3
    cw = skm(W, H, SKMConfig(**grouped(2)), mask=mask).compressed
    assert torch.equal(cw.mask, mask)
    assert (cw.dequantize()[~mask] == 0).all()
    # the LUT is fitted to kept weights only: it beats a LUT wasting entries near zero
    plain = kmeans(W * mask, None, KMeansConfig(**grouped(2))).compressed.dequantize().float() * mask
    fitted = skm(W, H, SKMConfig(**grouped(2), error_feedback=False), mask=mask).compressed.dequantize()
    kept_err = lambda d: float(((d.float() - W)[mask] ** 2).sum())  # noqa: E731
    assert kept_err(fitted) < kept_err(plain)


# ---- weighted k-means -------------------------------------------------------------------------


def test_weighted_kmeans_reaches_the_uniform_optimum():
    # uniform on [0, 1): optimal k centroids are (2j + 1) / 2k with error 1 / (12 k²)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1_000_000, generator=g)
    c, assign = weighted_kmeans(x, None, 8, seed=0, max_iters=200, tol=1e-6)
    assert torch.all(c[:, 1:] >= c[:, :-1])
    mse = ((x - c.gather(1, assign)) ** 2).mean(dim=1)
    assert (mse < 1.03 / (12 * 64)).all(), mse
    assert torch.allclose(c, (torch.arange(8) * 2 + 1).float()[None] / 16, atol=0.01)


def test_weighted_kmeans_follows_the_weights():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0, 11.0, 12.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1000.0]])
    c, assign = weighted_kmeans(x, w, 2, max_iters=50)
    assert c[0, 0] == pytest.approx(1.0) and c[0, 1] == pytest.approx((10 + 11 + 12000) / 1002, rel=1e-5)
    assert assign.tolist() == [[0, 0, 0, 1, 1, 1]]


def test_weighted_kmeans_fills_every_cluster_and_pads_small_groups():
    # a far outlier and a tight cluster: every one of the k centroids must be in use
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1, 500, generator=g) * 1e-3, torch.tensor([[100.0]])], dim=1)
    c, assign = weighted_kmeans(x, None, 16, max_iters=30)
    assert torch.unique(assign).numel() == 16
    # a group with fewer distinct values than k: exactly those values, the last one repeated
    y = torch.tensor([[3.0, 1.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    c, assign = weighted_kmeans(y, None, 4)
    assert c.tolist() == [[1.0, 2.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0]]
    assert torch.equal(c.gather(1, assign), y)


def test_weighted_kmeans_ignores_invalid_entries():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 4.0, 5.0, 8.0, 9.0]])
    valid = torch.tensor([[False, False, False, False, True, True, True, True]])
    c, _ = weighted_kmeans(x, None, 2, valid=valid, max_iters=50)
    assert c.tolist() == [[4.5, 8.5]]


# ---- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, key",
    [
        (dict(n_bits=5), "n_bits"),
        (dict(n_bits=7), "n_bits"),
        (dict(granularity="per_channel"), "granularity"),
        (dict(cluster_dim=2), "cluster_dim"),
        (dict(lut_dtype="float32"), "lut_dtype"),
        (dict(group_size=0), "group_size"),
        (dict(sparsity=1.5), "sparsity"),
        (dict(sensitivity="gradient"), "sensitivity"),
        (dict(bits=4), "bits"),  # not a palettization key
    ],
)
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(RecipeError, match=key):
        SKMConfig.from_dict(raw)


def test_group_size_must_divide_out_features():
    config = KMeansConfig(**grouped(4, group_size=48))
    with pytest.raises(RecipeError, match="group_size.*out_features"):
        config.check_shape(128, 64, "model.layers.0.mlp.up_proj")
    config.check_shape(96, 64, "ok")
    with pytest.raises(RecipeError, match="group_size"):
        skm(*correlated_layer(), SKMConfig(**grouped(4, group_size=48)))


def test_configs_round_trip_and_flags():
    assert SKMConfig.method == "skm" and SKMConfig.needs_hessian
    assert KMeansConfig.method == "kmeans" and not KMeansConfig.needs_hessian
    cfg = SKMConfig(**grouped(4), refit_lut=True)
    raw = cfg.to_dict()
    assert raw.pop("method") == "skm"
    assert SKMConfig.from_dict(raw) == cfg
    with pytest.raises(RecipeError, match="error_feedback"):
        KMeansConfig.from_dict({"error_feedback": True})
