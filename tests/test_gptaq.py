"""`--targets float` (GPTAQ-style): each layer is fitted to the float model's outputs on the inputs
the compressed model gives it, through the least-squares target W* solved on H̃ (float_targets.py)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from layerwise.engine import LayerwiseCompressor
from layerwise.errors import NumericalError, RecipeError
from layerwise.float_targets import CrossAccumulator, fitted_leaders, float_targets
from layerwise.hessian import HessianAccumulator
from layerwise.recipe import Recipe, recipe_from_dict
from layerwise.solvers import GPTQConfig, RTNConfig, SparseGPTConfig, gptq

from conftest import build_tiny_model


def layer_data(seed=0, out=8, inp=32, tokens=512, drift=0.15):
    """W [out, in]; X [tokens, in] the float inputs; X̃ = X·(I + drift·R) + noise, the inputs an
    upstream compression error would give (correlated with X, as in a real model)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g, dtype=torch.float64)
    R = torch.randn(inp, inp, generator=g, dtype=torch.float64) / inp**0.5
    Xq = X @ (torch.eye(inp, dtype=torch.float64) + drift * R) + 0.05 * torch.randn(tokens, inp, generator=g,
                                                                                     dtype=torch.float64)
    return W, X, Xq


def sums(X, Xq):
    """H̃ and D as the engine accumulates them (float32, 2/N scaling)."""
    h, d = HessianAccumulator(X.shape[1]), CrossAccumulator(X.shape[1])
    for rows in torch.arange(X.shape[0]).split(100):  # several batches, like the walker
        h.add(Xq[rows].float())
        d.add_pair(Xq[rows].float(), X[rows].float())
    return h.take_hessian(), d.take_hessian()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30], ids=["nan", "inf", "overflow"])
def test_a_non_finite_float_stream_is_an_error(bad):
    """A bad value anywhere in the float inputs (a later batch, a column whose compressed input is
    zero) stops the sum: the check reads only the cross term's diagonal."""
    d = CrossAccumulator(6)
    d.add_pair(torch.ones(4, 6), torch.ones(4, 6))
    x, x_float = torch.ones(300, 6), torch.ones(300, 6)
    x[:, 4] = 0  # Inf · 0 is NaN, still on the diagonal
    x_float[217, 4 if bad != 1e30 else 2] = bad
    x[217, 2] = 1e10 if bad == 1e30 else 1.0  # 1e30 · 1e10 overflows float32
    with pytest.raises(NumericalError, match="non-finite"):
        d.add_pair(x, x_float)


def objective(W, X, What, Xq) -> float:
    """||W X − Ŵ X̃||² in the row-major convention: Σ over tokens of |x Wᵀ − x̃ Ŵᵀ|²."""
    return float((X @ W.t() - Xq @ What.to(torch.float64).t()).square().sum())


def test_the_reduction_to_w_star_is_exact():
    """||W X − Ŵ X̃||² = N/2 · tr((W* − Ŵ) H̃ (W* − Ŵ)ᵀ) + const for every Ŵ (no damping), and W*
    is the least-squares fit of the float outputs on X̃."""
    W, X, Xq = layer_data()
    H, D = sums(X, Xq)
    (target,), _, _ = float_targets([W.float()], H, D, damp=0.0)
    lstsq = torch.linalg.lstsq(Xq, X @ W.t()).solution.t()
    assert (target.double() - lstsq).abs().max() <= 2e-4 * lstsq.abs().max()
    g = torch.Generator().manual_seed(1)
    gaps = []
    for _ in range(3):
        What = W + 0.3 * torch.randn(W.shape, generator=g, dtype=torch.float64)
        delta = target.double() - What
        gaps.append(objective(W, X, What, Xq) - X.shape[0] / 2 * float((delta @ H.double() * delta).sum()))
    assert max(gaps) - min(gaps) <= 1e-4 * objective(W, X, W, Xq)  # the constant does not depend on Ŵ


def test_equal_streams_give_w_exactly():
    """Where X = X̃ (block 0's first stage) D is exactly zero and W* = W bit for bit."""
    W, X, _ = layer_data()
    H, D = sums(X, X)
    assert not D.any()
    (target,), moved, _ = float_targets([W.float()], H, D)
    assert torch.equal(target, W.float()) and moved == [0.0]


def test_alpha_takes_that_fraction_of_the_step():
    W, X, Xq = layer_data()
    H, D = sums(X, Xq)
    (full,), (moved,), _ = float_targets([W.float()], H, D)
    (quarter,), (moved_quarter,), _ = float_targets([W.float()], H, D, alpha=0.25)
    assert torch.allclose(quarter, W.float() + 0.25 * (full - W.float()), atol=1e-5)
    assert moved_quarter == pytest.approx(0.25 * moved) and moved > 0.05


def test_a_fine_grid_approaches_the_least_squares_target():
    W, X, Xq = layer_data()
    H, D = sums(X, Xq)
    (target,), _, _ = float_targets([W.float()], H, D)
    fine = gptq(target, H, GPTQConfig(bits=8, block_size=32)).compressed.dequantize().double()
    assert (fine - target.double()).norm() <= 0.01 * target.norm()
    best, plain = objective(W, X, target, Xq), objective(W, X, W, Xq)
    assert objective(W, X, fine, Xq) <= best + 0.01 * (plain - best)  # within 1 % of the way from W* to W
    assert best < 0.8 * plain


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bits_beat_plain_gptq_on_the_float_objective(bits):
    config = GPTQConfig(bits=bits, block_size=32)
    for seed in range(3):
        W, X, Xq = layer_data(seed, out=16, inp=64, tokens=1024)
        H, D = sums(X, Xq)
        (target,), _, _ = float_targets([W.float()], H, D)
        ours = gptq(target, H, config).compressed.dequantize()
        plain = gptq(W.float(), H, config).compressed.dequantize()
        assert objective(W, X, ours, Xq) < 0.97 * objective(W, X, plain, Xq), seed


def test_one_row_of_four_columns_against_every_code():
    """2 bits, one row of 4 columns, 8 random layers: the GPTAQ answer (GPTQ on W*) against the
    exhaustive search over the 4⁴ codes of its own grid. The search is the optimum; GPTQ is greedy, so
    on these ill-conditioned 4-column layers it finds the optimum only sometimes (measured: 4 of 8,
    and once 13 × worse), while it beats plain GPTQ on W in total (measured: 7 of 8 layers)."""
    config = GPTQConfig(bits=2, act_order=False, mse_clip=False)
    found, ours_total, plain_total = 0, 0.0, 0.0
    for seed in range(8):
        W, X, Xq = layer_data(seed, out=1, inp=4, tokens=64, drift=0.3)
        H, D = sums(X, Xq)
        (target,), _, _ = float_targets([W.float()], H, D)
        cw = gptq(target, H, config).compressed
        scale, zero = float(cw.scale.reshape(-1)[0]), float(cw.zero_point.reshape(-1)[0])
        values = [float(torch.tensor((q - zero) * scale).half()) for q in range(4)]  # as dequantize() rounds
        best = min(objective(W, X, torch.tensor([codes], dtype=torch.float64), Xq)
                   for codes in itertools.product(values, repeat=4))
        ours = objective(W, X, cw.dequantize(), Xq)
        assert objective(W, X, target, Xq) <= best <= ours * (1 + 1e-6)
        found += ours <= best * (1 + 1e-6)
        ours_total += ours
        plain_total += objective(W, X, gptq(W.float(), H, config).compressed.dequantize(), Xq)
    assert found >= 4 and ours_total < 0.5 * plain_total


# ---- the engine ---------------------------------------------------------------------------------

def windows(n=16, L=64, seed=0):
    return torch.randint(4, 4096, (n, L), generator=torch.Generator().manual_seed(seed))


def compressed_model(recipe, targets="compressed", layers=2, **kwargs):
    model = build_tiny_model("llama", dtype=torch.float32, num_hidden_layers=layers)
    result = LayerwiseCompressor(model, recipe, device="cpu", targets=targets, **kwargs).compress(windows())
    return model, result


def final_hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[-1]


def test_block_zero_first_stage_is_plain_gptq_and_the_rest_differs():
    recipe = Recipe.single(GPTQConfig(bits=3, block_size=32))
    _, plain = compressed_model(recipe)
    _, ours = compressed_model(recipe, "float")
    same = {n for n in plain.compressed
            if all(torch.equal(a, b) for a, b in zip(plain.compressed[n].to_tensors().values(),
                                                     ours.compressed[n].to_tensors().values()))}
    assert same == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    notes = {r.name: r.notes for r in ours.layers}
    assert notes["model.layers.0.self_attn.q_proj"] == ["float target (alpha 0.4): |T - W| / |W| = 0"]
    assert notes["model.layers.1.mlp.up_proj"][0].startswith("float target (alpha 0.4): |T - W| / |W| = ")
    assert not any(n.startswith("float target") for n in notes["model.layers.1.mlp.down_proj"])


def test_float_all_fits_down_proj_too_and_float_leaves_it_on_its_own_weights():
    """'float' leaves the block's widest input (down_proj: intermediate 128 > hidden 64) fitted to its
    own weights; 'float-all' fits it too. Every other group is fitted identically in both."""
    recipe = Recipe.single(GPTQConfig(bits=3, block_size=32))
    _, some = compressed_model(recipe, "float", layers=1)
    _, every = compressed_model(recipe, "float-all", layers=1)
    notes = {r.name: r.notes for r in every.layers}
    assert notes["model.layers.0.mlp.down_proj"][0].startswith("float target (alpha 0.4): |T - W| / |W| = ")
    for name, cw in some.compressed.items():  # one block: down_proj is solved last, nothing after it differs
        same = all(torch.equal(a, b) for a, b in zip(cw.to_tensors().values(), every.compressed[name].to_tensors().values()))
        assert same == (name != "model.layers.0.mlp.down_proj"), name


def test_fitted_leaders_leave_out_only_a_strictly_widest_input():
    model = build_tiny_model("llama", dtype=torch.float32, num_hidden_layers=1)
    block = model.model.layers[0]
    leaders = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert fitted_leaders(block, leaders, every=False) == leaders[:3]
    assert fitted_leaders(block, leaders, every=True) == leaders
    assert fitted_leaders(block, leaders[:3], every=False) == leaders[:3]  # all 64 wide: a tie keeps them all
    assert fitted_leaders(block, ["mlp.down_proj"], every=False) == ["mlp.down_proj"]


def test_down_proj_is_left_out_whatever_the_recipe_solves():
    """The widest input is the block's, not the recipe's: a recipe solving only the MLP (or only
    down_proj) still leaves down_proj on its own weights under 'float'."""
    for match in (r"mlp\.", r"mlp\.down_proj"):
        recipe = recipe_from_dict({"rules": [{"match": match, "config": {"method": "gptq", "bits": 3, "block_size": 32}},
                                             {"match": ".*", "config": None}]})
        for lockstep in (True, False):
            _, result = compressed_model(recipe, "float", lockstep=lockstep)
            notes = {r.name: r.notes for r in result.layers}
            assert not any(n.startswith("float target") for n in notes["model.layers.1.mlp.down_proj"]), match
            if match == r"mlp\.":
                assert notes["model.layers.1.mlp.up_proj"][0].startswith("float target"), match


@pytest.mark.parametrize("config", [GPTQConfig(bits=2, block_size=32), GPTQConfig(bits=3, block_size=32),
                                    SparseGPTConfig(sparsity=0.5)], ids=["gptq2", "gptq3", "sparsegpt50"])
def test_float_targets_lower_the_final_output_error_on_the_calibration_data(config):
    """The exact fit (alpha 1) most, the default alpha 0.4 less (it trades calibration fit for
    generalization: on SmolLM2's held-out text it was the better one)."""
    reference = build_tiny_model("llama", dtype=torch.float32, num_hidden_layers=3)
    ids = windows()
    expected = final_hidden(reference, ids)
    errors = {}
    for targets, alpha in (("compressed", None), ("float", None), ("float", 1.0)):
        model, _ = compressed_model(Recipe.single(config), targets, layers=3, float_alpha=alpha)
        errors[targets, alpha] = float((final_hidden(model, ids) - expected).square().sum() / expected.square().sum())
    assert errors["float", 1.0] < 0.7 * errors["compressed", None], errors
    assert errors["float", 1.0] < errors["float", None] < errors["compressed", None], errors


@pytest.mark.parametrize("targets", ["float", "float-all"])
def test_every_scheduling_path_gives_the_same_weights(tmp_path, targets):
    """Lockstep (one forward per block), staged (one per stage) and offloaded activations (the float
    stream's files too) solve the same Hessians and cross terms in the same order."""
    recipe = Recipe.single(GPTQConfig(bits=3, block_size=32))
    runs = [dict(lockstep=True), dict(lockstep=False), dict(offload_dir=tmp_path / "acts")]
    results = [compressed_model(recipe, targets, **kw)[1].compressed for kw in runs]
    for other in results[1:]:
        for name, cw in results[0].items():
            assert all(torch.equal(a, b) for a, b in zip(cw.to_tensors().values(), other[name].to_tensors().values()))
    assert not any((tmp_path / "acts").rglob("*.f32"))  # every float-stream file removed


def test_lm_head_gets_its_cross_term_too():
    recipe = recipe_from_dict({"rules": [{"match": "lm_head", "config": {"method": "gptq", "bits": 3}},
                                         {"match": ".*", "config": {"method": "gptq", "bits": 3, "block_size": 32}}]})
    _, plain = compressed_model(recipe)
    _, ours = compressed_model(recipe, "float")
    assert not torch.equal(plain.compressed["lm_head"].codes, ours.compressed["lm_head"].codes)
    assert any(n.startswith("float target") for n in next(r for r in ours.layers if r.name == "lm_head").notes)


def test_data_free_recipes_and_unknown_targets_are_refused():
    model = build_tiny_model("llama", dtype=torch.float32)
    with pytest.raises(RecipeError, match="data-free"):
        LayerwiseCompressor(model, Recipe.single(RTNConfig(bits=4)), targets="float")
    with pytest.raises(RecipeError, match="--targets 'x' is unknown"):
        LayerwiseCompressor(model, Recipe.single(GPTQConfig(bits=4)), targets="x")


# ---- the command line, --resume, ranks ----------------------------------------------------------

def cli_args(src, calib, *extra):
    return ["compress", str(src), "--calib", str(calib), "--nsamples", "8", "--seqlen", "32", "--device", "cpu",
            "--method", "gptq", "--bits", "3", "--block-size", "32", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--method", "rtn", "--bits", "4"], "every method in the recipe is data-free"),
    (["--method", "gptq", "--target-bits", "3.5"], "--targets float cannot be combined with --target-bits/--target-mb"),
    (["--method", "gptq", "--bits", "3", "--targets", "floats"], "invalid choice: 'floats'"),
    (["--method", "gptq", "--bits", "3", "--float-alpha", "0"], "--float-alpha 0.0 must be a fraction in (0, 1]"),
    (["--method", "gptq", "--bits", "3", "--targets", "compressed", "--float-alpha", "0.5"],
     "--float-alpha 0.5 weighs the float targets' correction; it needs --targets float"),
], ids=["data-free", "budget", "unknown", "alpha-zero", "alpha-without-float"])
def test_bad_combinations_are_one_line_and_exit_2(tiny_dirs, calib_text_file, tmp_path, capsys, extra, message):
    from layerwise.cli import main

    args = ["compress", str(tiny_dirs["llama"]), "--calib", str(calib_text_file), "--nsamples", "8", "--seqlen", "32",
            "--targets", "float", *extra, "--out", str(tmp_path / "o")]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's refusal
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())


def test_the_manifest_names_float_targets_only(tiny_dirs, calib_text_file, tmp_path):
    from layerwise.cli import main

    for targets in ("compressed", "float"):
        assert main(["-q", *cli_args(tiny_dirs["llama"], calib_text_file, "--targets", targets,
                                     "--out", str(tmp_path / targets))]) == 0
    manifest = json.loads((tmp_path / "float" / "layerwise.json").read_text())
    assert manifest["targets"] == "float" and manifest["float_alpha"] == 0.4
    assert not {"targets", "float_alpha"} & set(json.loads((tmp_path / "compressed" / "layerwise.json").read_text()))


@pytest.mark.slow
def test_killed_float_run_resumes_to_the_same_bytes_and_refuses_other_targets(tmp_path, calib_text_file, capsys):
    """Blocks 0 and 1 written, then SIGKILL: the resumed run replays them (the float stream through
    their float weights, the compressed one through their written weights) and ends byte-identical."""
    import signal
    import subprocess
    import sys

    from checkpoint_compare import assert_same_checkpoint, save_sharded
    from layerwise.cli import main
    from test_resume import KILLER

    src = save_sharded(tmp_path / "src")
    args = cli_args(src, calib_text_file, "--targets", "float")
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(int(signal.SIGKILL)), "1", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    capsys.readouterr()
    assert main(cli_args(src, calib_text_file, "--out", str(out), "--resume")) == 2
    assert "targets was 'float, alpha 0.4' in the unfinished run and is 'compressed' now" in capsys.readouterr().err
    assert main(args + ["--out", str(out), "--resume", "--float-alpha", "1"]) == 2
    assert "targets was 'float, alpha 0.4' in the unfinished run and is 'float, alpha 1' now" in capsys.readouterr().err
    assert main(args + ["--out", str(out), "--resume"]) == 0
    assert_same_checkpoint(out, tmp_path / "whole")


def _float_rank(rank: int, world: int, store: str, src: str, calib: str, root: str) -> None:
    import torch.distributed as dist

    from layerwise.distributed import Ranks
    from layerwise.job import CompressJob
    from layerwise.pipeline import compress_to_checkpoint

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        compress_to_checkpoint(CompressJob(src, f"{root}/two", LM_HEAD_TOO, calib, ranks=Ranks(rank, world),
                                           targets="float", **RANK_CALIB))
    finally:
        dist.destroy_process_group()


LM_HEAD_TOO = recipe_from_dict({"rules": [{"match": "lm_head", "config": {"method": "gptq", "bits": 8}},
                                          {"match": ".*", "config": {"method": "gptq", "bits": 3, "block_size": 32}}]})
RANK_CALIB = dict(nsamples=10, seqlen=32, seed=0, batch_size=2, device="cpu")  # 5 batches: 2 + 3 per rank


@pytest.mark.slow
def test_two_gloo_ranks_write_the_one_process_bytes(tmp_path, calib_text_file):
    """The cross terms are summed along the Hessians' fixed tree: 2 ranks, 1 process, the same bytes."""
    import torch.multiprocessing as mp

    from checkpoint_compare import file_hashes, manifest_without_timings, save_sharded
    from layerwise.job import CompressJob
    from layerwise.pipeline import compress_to_checkpoint

    src = save_sharded(tmp_path / "src")
    mp.spawn(_float_rank, args=(2, str(tmp_path / "store"), str(src), str(calib_text_file), str(tmp_path)), nprocs=2)
    single, _ = compress_to_checkpoint(CompressJob(str(src), tmp_path / "one", LM_HEAD_TOO, str(calib_text_file),
                                                   targets="float", **RANK_CALIB))
    assert len(file_hashes(single)) >= 4 and file_hashes(tmp_path / "two") == file_hashes(single)
    assert manifest_without_timings(tmp_path / "two") == manifest_without_timings(single)


def test_a_compressed_embedding_leaves_the_float_stream_on_the_float_embedding():
    """The float model reads the float embedding: with `--embeddings 8` block 0's inputs differ between
    the streams, so even block 0's q/k/v get a target W* ≠ W."""
    recipe = Recipe.single(GPTQConfig(bits=3, block_size=32)).with_embeddings(RTNConfig(bits=8))
    _, ours = compressed_model(recipe, "float")
    note = next(r for r in ours.layers if r.name == "model.layers.0.self_attn.q_proj").notes[0]
    assert note.startswith("float target (alpha 0.4): |T - W| / |W| = ") and float(note.rsplit("= ", 1)[1]) > 0
