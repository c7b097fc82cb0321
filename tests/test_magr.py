"""MagR (`--magr`): the ℓ∞ prox, and the layer problem ½ tr((V − W) H (V − W)ᵀ) + α Σ_g ‖V_g‖_∞ against
direct solutions."""

import json

import pytest
import torch

from layerwise.magr import project_onto_l1_ball, prox_linf, reduce_magnitude


def bisected_projection(v: torch.Tensor, radius: float) -> torch.Tensor:
    """The ℓ1-ball projection of one vector by bisection on θ (Σ (|v| − θ)₊ = radius)."""
    a = v.double().abs()
    if a.sum() <= radius:
        return v.double()
    lo, hi = 0.0, float(a.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((a - mid).clamp(min=0).sum()) > radius else (lo, mid)
    return v.double().sign() * (a - hi).clamp(min=0)


@pytest.mark.parametrize("radius", [1e-4, 0.05, 1.0, 50.0])
def test_projection_and_prox_against_bisection(radius):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, 33, generator=g, dtype=torch.float64) * torch.rand(64, 1, generator=g, dtype=torch.float64)
    projected, prox = project_onto_l1_ball(v, radius), prox_linf(v, radius)
    for row, p, x in zip(v, projected, prox):
        exact = bisected_projection(row, radius)
        assert (p - exact).abs().max() <= 1e-9
        assert (x - (row - exact)).abs().max() <= 1e-9  # Moreau: prox of t‖·‖∞ = v − P_{‖·‖₁ ≤ t}(v)


def test_prox_is_the_minimizer_of_its_objective():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(8, 16, generator=g, dtype=torch.float64)
    t = 0.7
    u = prox_linf(v, t)

    def objective(x):
        return 0.5 * (x - v).square().sum(1) + t * x.abs().amax(1)

    for _ in range(20):
        assert (objective(u) <= objective(u + 1e-3 * torch.randn(v.shape, generator=g, dtype=torch.float64)) + 1e-12).all()


def test_diagonal_hessian_matches_the_one_dimensional_solution():
    """With H diagonal the problem separates for a fixed τ = ‖v‖∞ (v_i = clip(w_i, ±τ)), so the
    optimum is a scan over τ: MagR's iterations must reach it."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1, 12, generator=g, dtype=torch.float64)
    h = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    H = torch.diag(h / h.max())  # largest eigenvalue 1: MagR's scaling leaves it as it is
    alpha = 0.05
    taus = torch.linspace(0, float(w.abs().max()), 200001, dtype=torch.float64)
    clipped = torch.minimum(w.abs(), taus[:, None]) * w.sign()
    costs = 0.5 * ((clipped - w).square() * H.diagonal()).sum(1) + alpha * taus
    best = clipped[costs.argmin()]
    V = reduce_magnitude(w.float(), H.float(), alpha=alpha, iterations=3000)
    assert (V.double() - best).abs().max() <= 1e-4


@pytest.mark.parametrize("block_size", [None, 8, 12])
def test_full_hessian_reaches_a_fixed_point_of_the_proximal_map(block_size):
    """For a convex problem a fixed point of V ↦ prox(V − ∇f(V)) is the optimum; the objective is
    below W's own and below any nearby point's; the outputs on the calibration inputs barely move."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 24, generator=g) @ torch.randn(24, 24, generator=g)
    H = X.t() @ X / 512
    W = torch.randn(6, 24, generator=g)
    alpha = 0.01
    V = reduce_magnitude(W, H, block_size=block_size, alpha=alpha, iterations=4000)
    Hn = H / torch.linalg.eigvalsh(H.double()).max().float()
    group = block_size or 24
    padded = -(-24 // group) * group

    def penalty(M):
        return torch.nn.functional.pad(M, (0, padded - 24)).reshape(-1, group).abs().amax(1).sum()

    def objective(M):
        return float(0.5 * torch.einsum("oi,ij,oj->", M - W, Hn, M - W) + alpha * penalty(M))

    step = torch.nn.functional.pad(V - (V - W) @ Hn, (0, padded - 24))
    again = prox_linf(step.reshape(-1, group), alpha).reshape(6, padded)[:, :24]
    assert (again - V).abs().max() <= 1e-5
    assert objective(V) < objective(W)
    for _ in range(20):
        assert objective(V) <= objective(V + 1e-3 * torch.randn(V.shape, generator=g)) + 1e-7
    assert penalty(V) < penalty(W)


def test_a_layer_no_input_reached_is_left_as_it_is():
    W = torch.randn(4, 8)
    assert torch.equal(reduce_magnitude(W, torch.zeros(8, 8)), W)


def _compress(tiny_dir, calib, out, *extra):
    from layerwise.cli import main

    return main(["-q", "compress", str(tiny_dir), "--calib", str(calib), "--nsamples", "8", "--seqlen", "32",
                 "--out", str(out), *extra])


def test_magr_shrinks_the_ranges_gptq_then_quantizes_and_the_manifest_says_so(tiny_dirs, calib_text_file, tmp_path):
    from layerwise.checkpoint import load_compressed

    ranges = {}
    for name, extra in (("plain", []), ("magr", ["--magr"])):
        assert _compress(tiny_dirs["llama"], calib_text_file, tmp_path / name, "--method", "gptq", "--bits", "3",
                         *extra) == 0
        manifest = json.loads((tmp_path / name / "layerwise.json").read_text())
        notes = [n for layer in manifest["layers"].values() for n in layer["report"]["notes"] if n.startswith("magr")]
        assert (manifest.get("magr") is True, len(notes)) == ((True, len(manifest["layers"])) if extra else (False, 0))
        model = load_compressed(tmp_path / name).model
        ranges[name] = torch.stack([m.weight.float().abs().amax(1).mean() for n, m in model.named_modules()
                                    if n.endswith(("q_proj", "down_proj"))])
    assert (ranges["magr"] < ranges["plain"]).all()


@pytest.mark.parametrize("extra,message", [
    (["--method", "rtn", "--bits", "4"], "--magr shrinks the range of integer grids solved with a Hessian"),
    (["--method", "skm", "--bits", "3"], "--magr shrinks the range of integer grids solved with a Hessian"),
    (["--method", "gptq", "--target-bits", "3.5"], "--magr cannot be combined with --target-bits/--target-mb"),
], ids=["data-free", "lut", "budget"])
def test_magr_where_it_cannot_apply_is_one_line_and_exit_2(tiny_dirs, calib_text_file, tmp_path, capsys, extra, message):
    assert _compress(tiny_dirs["llama"], calib_text_file, tmp_path / "o", "--magr", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_resumed_run_must_repeat_magr():
    from layerwise.job import CompressJob
    from layerwise.recipe import Recipe
    from layerwise.solvers import GPTQConfig

    def job(**kw):
        return CompressJob("m", "o", Recipe.single(GPTQConfig(bits=3)), "c", **kw)

    assert job().targets_record == "compressed" and job().targets_entry == {}
    assert job(magr=True).targets_record == "compressed, magr" and job(magr=True).targets_entry == {"magr": True}
    assert job(magr=True, targets="float").targets_record == "float, alpha 0.4, magr"
