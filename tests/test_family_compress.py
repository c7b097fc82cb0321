"""The compress side for every family: compress → decompress equals the dequantized codes, fused
projections (Phi-3) and GPT-2's Conv1D compressed as the linears they are, MoE refused, and the
summary saying which block weights stayed float16."""

import json

import pytest
import torch

from layerwise.checkpoint import decompress, load_compressed, read_tensors
from layerwise.cli import main
from layerwise.engine import LayerwiseCompressor
from layerwise.errors import ModelError
from layerwise.linears import left_out_summary, left_out_weights, to_module_layout, weight_out_in
from layerwise.job import CompressJob
from layerwise.pipeline import compress_to_checkpoint
from layerwise.recipe import Recipe, recipe_from_dict
from layerwise.solvers import GPTQConfig

from conftest import FAMILY_KINDS, build_tiny_model, save_tiny_model

GPT2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)  # Conv1D blocks, LayerNorm, tied head
MOE = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
RECIPE = Recipe.single(GPTQConfig(bits=4, block_size=32))


def calib(n=8, L=64):  # longer than the 16-token sliding windows of FAMILY_OVERRIDES
    return torch.randint(4, 4096, (n, L), generator=torch.Generator().manual_seed(3))


def overrides(kind):
    return GPT2 if kind == "gpt2" else {}


@pytest.mark.parametrize("kind", FAMILY_KINDS + ("gpt2",))
def test_compress_decompress_equals_dequantized_codes(kind, tmp_path):
    source = save_tiny_model(tmp_path / "src", kind, **overrides(kind))
    original = build_tiny_model(kind, **overrides(kind))  # the same float16 weights
    path, result = compress_to_checkpoint(CompressJob(str(source), tmp_path / "q4", RECIPE, calib="test", device="cpu"),
                                          windows=calib())
    manifest = json.loads((path / "layerwise.json").read_text())
    assert manifest["left_uncompressed"]["weights"] == 0  # every block weight compressed
    assert len(result.layers) == manifest["left_uncompressed"]["block_weights"] > 0

    dense_dir = decompress(path, tmp_path / "dense")
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    _, compressed = read_tensors(path)
    for name, cw in compressed.items():
        module = dense.get_submodule(name)
        codes = cw.dequantize()  # [out, in]
        assert torch.equal(module.weight.data.view(torch.int16), to_module_layout(module, codes).view(torch.int16)), name
        # the codes approximate the original's [out, in] view (a transposed Conv1D would not)
        w = weight_out_in(original.get_submodule(name)).float()
        assert ((codes.float() - w).norm() / w.norm()) < 0.15, name
    compressed_weights = {f"{n}.weight" for n in compressed}
    for name, p in original.named_parameters():
        if name not in compressed_weights:
            assert torch.equal(dense.get_parameter(name), p), name  # norms, biases, embeddings untouched

    ids = calib(2, 48)
    with torch.no_grad():  # the dense checkpoint and the checkpoint itself are one model
        a = dense.float()(input_ids=ids).logits
        b = load_compressed(path).model(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4


def test_phi3_fused_projections_are_compressed_as_one_linear():
    model = build_tiny_model("phi3", dtype=torch.float32)
    result = LayerwiseCompressor(model, RECIPE, device="cpu").compress(calib())
    attn = model.model.layers[0].self_attn
    q, kv = attn.config.num_attention_heads * attn.head_dim, attn.config.num_key_value_heads * attn.head_dim
    shapes = {name: tuple(cw.shape) for name, cw in result.compressed.items()}
    assert shapes["model.layers.0.self_attn.qkv_proj"] == (q + 2 * kv, 64)
    assert shapes["model.layers.0.mlp.gate_up_proj"] == (2 * 128, 64)
    assert len(shapes) == 2 * 4 and result.left_out["weights"] == 0
    errors = {r.name: r.rel_error for r in result.layers}
    assert all(0 < e < 0.05 for e in errors.values()), errors  # solved against the real inputs (output error)


@pytest.mark.slow
def test_gpt2_conv1d_gptq_beats_rtn_on_its_own_inputs():
    """Conv1D weights are solved as [out, in] with the Hessian of their inputs: GPTQ's output error
    is below round-to-nearest's on every layer, including the square attention c_proj."""
    errors = {}
    for method in ("gptq", "rtn"):
        model = build_tiny_model("gpt2", dtype=torch.float32, **GPT2)
        recipe = recipe_from_dict({"rules": [{"match": ".*", "config": {"method": method, "bits": 3}}]})
        compressor = LayerwiseCompressor(model, recipe, device="cpu")
        result = compressor.compress(calib(), on_block_output=lambda *a: None)  # streamed: output-space error for both
        errors[method] = {r.name: r.rel_error for r in result.layers}
    assert set(errors["gptq"]) == {f"transformer.h.{i}.{n}" for i in range(2)
                                   for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    for name, gptq in errors["gptq"].items():
        assert gptq < errors["rtn"][name], name


@pytest.mark.parametrize("kind", sorted(MOE))
def test_moe_experts_are_refused_by_name(kind):
    model = build_tiny_model(kind, dtype=torch.float32, **MOE[kind])
    with pytest.raises(ModelError, match=r"mixture-of-experts weights are unsupported: model\.layers\.0\.mlp\.experts\."
                                         r"gate_up_proj \[4, \d+, 64\]"):
        LayerwiseCompressor(model, RECIPE, device="cpu")


def test_moe_cli_is_one_line_exit_2(tmp_path, capsys):
    source = save_tiny_model(tmp_path / "moe", "qwen3_moe", **MOE["qwen3_moe"])
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["compress", str(source), "--out", str(out), "--method", "rtn", "--bits", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3-D expert tensors" in err and "Traceback" not in err
    assert not out.exists()


def test_summary_says_which_block_weights_stay_float16(tmp_path, capsys):
    source = save_tiny_model(tmp_path / "src", "llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rules:\n  - match: 'mlp\\.'\n    config: null\n  - match: '.*'\n    config: {method: rtn, bits: 4}\n")
    out = tmp_path / "q"
    assert main(["compress", str(source), "--out", str(out), "--recipe", str(recipe)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # per block: gate/up/down 3 · 128 · 64 of q/o 2 · 64 · 64 + k/v 2 · 32 · 64 + 3 · 128 · 64 parameters
    assert ("6 of 14 block weights (66.7% of their parameters) left float16: model.layers.*.mlp.gate_proj.weight, "
            "model.layers.*.mlp.up_proj.weight, model.layers.*.mlp.down_proj.weight (recipe: none)") in line
    left = json.loads((out / "layerwise.json").read_text())["left_uncompressed"]
    assert left["parameters"] == 2 * 3 * 128 * 64 and left["block_parameters"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["left_uncompressed"] == left


def test_non_linear_block_matrices_are_reported():
    """A block matrix outside nn.Linear / Conv1D (here an MoE router) is counted, with its module type."""
    model = build_tiny_model("llama", dtype=torch.float32)
    for block in model.model.layers:
        block.router = torch.nn.Module()
        block.router.weight = torch.nn.Parameter(torch.zeros(4, 64))
    planned = {f"model.layers.{i}.{n}" for i in range(2) for n, m in model.model.layers[i].named_modules()
               if isinstance(m, torch.nn.Linear)}
    summary = left_out_summary(left_out_weights(model.model.layers, "model.layers", planned), model.model.layers)
    assert summary["weights"] == 2 and summary["parameters"] == 2 * 4 * 64
    assert summary["reasons"] == {"not a linear layer (Module)": {"weights": 2, "parameters": 512,
                                                                  "kinds": ["model.layers.*.router.weight"]}}


@pytest.mark.slow
def test_gpt2_checkpoint_and_its_decompressed_copy_have_the_same_perplexity(tmp_path, calib_text_file, capsys):
    source = save_tiny_model(tmp_path / "gpt2", "gpt2", **GPT2)
    out, dense = tmp_path / "q4", tmp_path / "dense"
    assert main(["-q", "compress", str(source), "--out", str(out), "--calib", str(calib_text_file), "--nsamples", "8",
                 "--seqlen", "64", "--device", "cpu", "--method", "gptq", "--bits", "4", "--block-size", "32"]) == 0
    assert main(["-q", "decompress", str(out), "--out", str(dense)]) == 0
    ppl = []
    for target in (source, out, dense):
        capsys.readouterr()
        assert main(["-q", "ppl", str(target), "--data", str(calib_text_file), "--seqlen", "64", "--json"]) == 0
        ppl.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"])
    assert ppl[1] == pytest.approx(ppl[2], rel=1e-6)
    assert ppl[1] != ppl[0]  # the weights did change
