"""Fast float32 products: used only where the backend keeps float32 accuracy, scoped to the compress run."""

import torch

import layerwise.matmul_precision as mp
from layerwise.engine import LayerwiseCompressor
from layerwise.hessian import HessianAccumulator
from layerwise.recipe import Recipe
from layerwise.solvers import GPTQConfig

from conftest import build_tiny_model

CPU = torch.device("cpu")


def test_plain_float32_passes_the_probe_and_a_bfloat16_product_fails_it():
    assert mp.probe_error(CPU, "highest") <= mp.PROBE_TOLERANCE
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(256, 1024, generator=g), torch.randn(1024, 256, generator=g)
    exact = a.double() @ b.double()
    one_pass = (a.bfloat16().float() @ b.bfloat16().float()).double()  # what a plain bfloat16 mode computes
    assert float((one_pass - exact).norm() / exact.norm()) > 10 * mp.PROBE_TOLERANCE


def test_an_inaccurate_fast_mode_is_not_used(monkeypatch):
    mp.fast_matmul_is_accurate.cache_clear()
    monkeypatch.setattr(mp, "probe_error", lambda device, precision="medium": 1e-3)  # e.g. TF32
    try:
        assert not mp.fast_matmul_is_accurate(CPU)
        with mp.fast_float32_matmul(CPU):
            assert torch.get_float32_matmul_precision() == "highest"
    finally:
        mp.fast_matmul_is_accurate.cache_clear()


def test_a_hessian_under_the_fast_mode_is_float32_accurate():
    """Whatever mode the probe picks here, XᵀX stays within float32-level error of float64."""
    x = torch.randn(2048, 384, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 384)
    exact = 2 / 2048 * (x.double().t() @ x.double())
    acc = HessianAccumulator(384)
    with mp.fast_float32_matmul(CPU):
        acc.add(x)
    assert float((acc.hessian.double() - exact).norm() / exact.norm()) <= 1e-5


def test_the_engine_runs_in_the_mode_it_chose_and_restores_the_setting():
    seen = []
    for fast in (True, False):
        model = build_tiny_model("llama", dtype=torch.float32)
        hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda m, i: seen.append(torch.get_float32_matmul_precision()))
        compressor = LayerwiseCompressor(model, Recipe.single(GPTQConfig(bits=4)), device="cpu", fast_matmul=fast)
        compressor.compress(torch.randint(4, 4096, (4, 32), generator=torch.Generator().manual_seed(0)))
        hook.remove()
        expected = "medium" if fast and mp.fast_matmul_is_accurate(CPU) else "highest"
        assert compressor.fast_matmul == (expected == "medium")
        assert seen and set(seen) == {expected}
        assert torch.get_float32_matmul_precision() == "highest"
        seen.clear()


def test_perplexity_runs_in_the_mode_it_chose_and_gives_the_float32_number():
    """ppl's products go through bfloat16 units where accurate (the 262k-token output head of Gemma 3
    is most of its work); the perplexity stays the plain float32 one to float32 accuracy."""
    from layerwise.evaluate import perplexity

    model = build_tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(4, 4096, (4 * 64,), generator=torch.Generator().manual_seed(3))
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, i: seen.append(torch.get_float32_matmul_precision()))
    fast, exact = (perplexity(model, ids, seqlen=64, fast_matmul=f) for f in (True, False))
    hook.remove()
    accurate = mp.fast_matmul_is_accurate(CPU)
    assert fast["matmul"] == ("bfloat16-units" if accurate else "float32") and exact["matmul"] == "float32"
    assert seen == ["medium" if accurate else "highest", "highest"]
    assert abs(fast["nll"] - exact["nll"]) <= 1e-6 * exact["nll"]
    assert torch.get_float32_matmul_precision() == "highest"
