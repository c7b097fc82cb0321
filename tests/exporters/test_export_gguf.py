"""`layerwise export --format gguf`: gguf-py's reader decodes every block tensor to the checkpoint's
weights bit for bit (with --grid gguf), conversions are named in the summary, and llama.cpp (when
llama-cpp-python is installed) gives our model's logits and greedy tokens."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from cli_steps import compress, export_as

from layerwise.checkpoint import load_compressed
from layerwise.cli import main
from layerwise.exporters.gguf import GGUF, rope_permutation
from layerwise.exporters.gguf_blocks import gguf_type
from layerwise.formats import CompressedWeight

gguf = pytest.importorskip("gguf")

export = partial(export_as, "gguf")


def decoded(path, loaded) -> dict[str, tuple[str, np.ndarray]]:
    """layer → (GGUF type, float32 weight as gguf-py decodes it, q/k rows back in Hugging Face order)."""
    from gguf.quants import dequantize

    config = loaded.model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    out = {}
    for layer, cw in loaded.compressed.items():
        t = tensors[names.get_name(f"{layer}.weight", try_suffixes=(".weight",))]
        w = dequantize(t.data, t.tensor_type).reshape(cw.shape).astype(np.float32)
        kind = layer.rpartition(".")[2]
        if kind in heads:
            w = w[torch.argsort(rope_permutation(cw.shape[0], heads[kind])).numpy()]
        out[layer] = (t.tensor_type.name, w)
    return out


@pytest.mark.parametrize("flags, kind", [
    (["--bits", "4", "--sym"], "Q4_0"),
    (["--bits", "4", "--asym"], "Q4_1"),
    (["--bits", "8", "--sym"], "Q8_0"),
    (["--bits", "5", "--asym"], "Q5_1"),
    (["--bits", "5", "--sym"], "Q5_0"),
])
def test_gguf_grid_decodes_bit_for_bit(flags, kind, tiny_dirs, calib_text_file, tmp_path, capsys):
    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--method", "rtn", "--block-size", "32",
                  "--grid", "gguf", *flags)
    summary = export(ck, tmp_path / "m.gguf", capsys)
    assert f"14 {kind}" in summary and "bit for bit" in summary
    loaded = load_compressed(ck, dtype=None)
    for layer, (found, w) in decoded(tmp_path / "m.gguf", loaded).items():
        assert found == kind
        assert np.array_equal(w, loaded.compressed[layer].dequantize().float().numpy()), layer


@pytest.mark.parametrize("bits, kind", [("8", "Q8_0"), ("4", "Q4_1")])
def test_embeddings_flag_travels_exactly(bits, kind, tiny_dirs, calib_text_file, tmp_path, capsys):
    """`--embeddings 8|4` is GGUF's own layout (symmetric / asymmetric blocks of 32): on the gguf lattice the
    token table is written in that type and decodes to the checkpoint's bits."""
    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--method", "rtn", "--bits", "4", "--sym",
                  "--block-size", "32", "--grid", "gguf", "--embeddings", bits)
    summary = export(ck, tmp_path / "m.gguf", capsys)
    assert "bit for bit" in summary
    loaded = load_compressed(ck, dtype=None)
    found, w = decoded(tmp_path / "m.gguf", loaded)["model.embed_tokens"]
    assert found == kind
    assert np.array_equal(w, loaded.compressed["model.embed_tokens"].dequantize().float().numpy())


@pytest.mark.slow
def test_gptq_gguf_grid_and_conversions_in_one_line(tiny_dirs, calib_text_file, tmp_path, capsys):
    recipe = tmp_path / "mixed.json"
    recipe.write_text(json.dumps({"rules": [
        {"match": r"q_proj", "config": {"method": "rtn", "bits": 4, "block_size": 16}},  # no GGUF type: F16
        {"match": r"down_proj", "config": {"method": "kmeans", "n_bits": 4}},  # LUT: F16
        {"match": r"\.", "config": {"method": "gptq", "bits": 4, "block_size": 64, "grid": "gguf"}},
    ]}))
    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--recipe", str(recipe))
    summary = export(ck, tmp_path / "m.gguf", capsys)
    assert "10 Q4_1" in summary and "2 4-bit blocks of 16 → F16" in summary and "2 lut → F16" in summary
    assert "bit for bit" in summary
    loaded = load_compressed(ck, dtype=None)
    for layer, (_, w) in decoded(tmp_path / "m.gguf", loaded).items():
        assert np.array_equal(w, loaded.compressed[layer].dequantize().float().numpy()), layer


def test_default_grid_reports_the_largest_difference(tiny_dirs, calib_text_file, tmp_path, capsys):
    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--method", "rtn", "--bits", "4",
                  "--block-size", "32", "--sym")
    summary = export(ck, tmp_path / "m.gguf", capsys)
    report = float(summary.split("largest difference from the checkpoint's weights ")[1].split()[0])
    loaded = load_compressed(ck, dtype=None)
    worst = max(float(np.abs(w - loaded.compressed[n].dequantize().float().numpy()).max())
                for n, (_, w) in decoded(tmp_path / "m.gguf", loaded).items())
    assert worst > 0 and f"{worst:.3g}" == f"{report:.3g}" and "--grid gguf" in summary


def test_types_and_price():
    def affine(bits, blocks, sym):
        z = 2 ** (bits - 1) if sym else 1
        return CompressedWeight((4, 128), "affine", bits, codes=torch.zeros(4, 128, dtype=torch.uint8),
                                scale=torch.ones(4, blocks, dtype=torch.float16),
                                zero_point=torch.full((4, blocks), z, dtype=torch.uint8))

    assert [gguf_type(affine(b, 4, True)) for b in (2, 3, 4, 5, 6, 8)] == ["Q4_0"] * 3 + ["Q5_0", "Q8_0", "Q8_0"]
    assert [gguf_type(affine(b, 4, False)) for b in (3, 4, 5, 7, 8)] == ["Q4_0", "Q4_1", "Q5_1", "Q8_0", None]
    assert gguf_type(affine(4, 1, False)) == "Q4_1"  # per-channel: every block of 32 with the row's scale
    assert gguf_type(affine(4, 8, False)) is None  # blocks of 16
    assert GGUF().layer_bytes(affine(4, 4, True)) == 4 * 4 * 18
    assert GGUF().layer_bytes(affine(4, 8, True)) == 2 * 4 * 128


def test_refuses_a_family_llama_cpp_is_not_given(tmp_path, capsys):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "granite", "granite")
    assert main(["-q", "export", str(model), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) != 0
    assert "does not support model_type 'granite'" in capsys.readouterr().err


def test_other_rope_scalings_are_refused_in_one_line(tmp_path, capsys):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "llama", "llama", rope_parameters=dict(rope_type="yarn", rope_theta=10000.0,
                                                                              factor=4.0,
                                                                              original_max_position_embeddings=64))
    capsys.readouterr()
    assert main(["-q", "export", str(model), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not write 'yarn' rope scaling (it writes llama3, longrope)" in err[0]
    assert not (tmp_path / "m.gguf").exists()


def llama_cpp_model(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind, overrides", [
    ("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("phi3", {}),
    ("phi3", {"partial_rotary_factor": 0.5, "tie_word_embeddings": True}),  # Phi-4-mini: 3/4 of each head rotated, tied
], ids=["llama", "mistral", "qwen2", "qwen3", "phi3", "phi3-partial-rotary-tied"])
def test_llama_cpp_logits_match(kind, overrides, calib_text_file, tmp_path, capsys):
    """(With the rope dimension count of the whole head, the partial-rotary phi3 is off by 0.58.)"""
    from conftest import save_tiny_model

    pytest.importorskip("llama_cpp")
    model = save_tiny_model(tmp_path / kind, kind, **overrides)
    ck = compress(model, tmp_path / "ck", calib_text_file, "--method", "gptq", "--bits", "4",
                  "--block-size", "32", "--grid", "gguf")
    export(ck, tmp_path / "m.gguf", capsys)
    llm = llama_cpp_model(tmp_path / "m.gguf")
    ids = [1, 200, 37, 999, 4000, 12, 512, 7]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = load_compressed(ck, dtype=torch.float32).model(torch.tensor([ids])).logits[0].numpy()
    # the weights are ours exactly; llama.cpp rounds the activations to 8 bits for its block dot products
    assert np.abs(theirs - ours).max() < 5e-2 * max(1.0, np.abs(ours).max())


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_match_on_the_demo_model(calib_text_file, tmp_path, capsys):
    from layerwise.models import DEMO_MODEL_DIR

    pytest.importorskip("llama_cpp")
    ck = compress(DEMO_MODEL_DIR, tmp_path / "ck", calib_text_file, "--method", "rtn", "--bits", "4",
                  "--block-size", "32", "--grid", "gguf")
    export(ck, tmp_path / "m.gguf", capsys)
    llm = llama_cpp_model(tmp_path / "m.gguf")
    model = load_compressed(ck, dtype=torch.float32).model
    ids = [1] + llm.tokenize(b"The history of the city", add_bos=False)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == 20:
            break
    assert len(greedy) == 20 and tokens == greedy


def test_price_is_within_one_percent_of_the_file(tiny_dirs, calib_text_file, tmp_path, capsys):
    from layerwise.loading import load_checkpoint

    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--method", "rtn", "--bits", "4",
                  "--block-size", "32")
    export(ck, tmp_path / "m.gguf", capsys)
    loaded = load_checkpoint(ck, dense=False)
    price = GGUF().fixed_bytes(loaded.model, list(loaded.compressed))
    price += sum(GGUF().layer_bytes(cw) for cw in loaded.compressed.values())
    assert abs(price / (tmp_path / "m.gguf").stat().st_size - 1) < 0.01


LONGROPE_256 = dict(
    sliding_window=None, max_position_embeddings=1024, original_max_position_embeddings=256, rope_parameters=dict(
    rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, original_max_position_embeddings=256,
    short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=[2.0, 2.5, 3.0, 3.5]))  # short factors up to 256 tokens


@pytest.mark.slow
@pytest.mark.parametrize("variant, overrides, n_ctx, length", [
    ("llama3_rope", {}, 64, 48),
    ("phi3_longrope", {"sliding_window": None}, 64, 48),  # 48 tokens > the original 32: long factors
    ("phi3_longrope", LONGROPE_256, 256, 30),  # 30 tokens, a 256-token context, the original 256: short factors
], ids=["llama3", "longrope-long", "longrope-short"])
def test_llama_cpp_follows_rope_scaling(variant, overrides, n_ctx, length, calib_text_file, tmp_path, capsys):
    """Llama 3's rope_freqs and LongRoPE's two factor sets with its attention factor (with the plain
    rope either is off by > 1). llama.cpp takes the long factors when its context (padded to 256) is
    longer than the original one, HF when the sequence is: both sides of the switch are checked.
    (llama.cpp ignores Phi-3's sliding window: the export warns, and the test drops it.)"""
    from conftest import FAMILY_VARIANTS, save_tiny_model

    llama_cpp = pytest.importorskip("llama_cpp")
    kind, base = FAMILY_VARIANTS[variant]
    model = save_tiny_model(tmp_path / kind, kind, **{**base, **overrides})
    ck = compress(model, tmp_path / "ck", calib_text_file, "--method", "gptq", "--bits", "4",
                  "--block-size", "32", "--grid", "gguf")
    export(ck, tmp_path / "m.gguf", capsys)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=n_ctx, logits_all=True, verbose=False)
    ids = [1] + torch.randint(4, 4000, (length - 1,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = load_compressed(ck, dtype=torch.float32).model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 5e-2 * max(1.0, np.abs(ours).max())


# llama.cpp's Gemma 3 fixes what the config may vary: every 6th layer global, attention scaled by head_dim
GEMMA3_AS_LLAMA_CPP = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"],
                           query_pre_attn_scalar=16)


@pytest.mark.slow
@pytest.mark.parametrize("compressed", [False, True], ids=["float16", "gptq-4bit"])
def test_llama_cpp_runs_gemma3_past_its_sliding_window(compressed, calib_text_file, tmp_path, capsys):
    """(1 + w) norms shifted, the window and the two rope bases kept: the float16 export is llama.cpp's
    float16 rounding away from HF (~0.006; 3.8 past the 16-token window if the window were dropped),
    the GPTQ one its 8-bit activations away."""
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    pytest.importorskip("llama_cpp")
    model = save_tiny_model(tmp_path / "g3", "gemma3_text", **GEMMA3_AS_LLAMA_CPP)
    source = compress(model, tmp_path / "ck", calib_text_file, "--method", "gptq", "--bits", "4", "--block-size",
                      "32", "--grid", "gguf") if compressed else model
    export(source, tmp_path / "m.gguf", capsys)
    llm = llama_cpp_model(tmp_path / "m.gguf")
    ids = [2] + torch.randint(4, 4000, (39,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        reference = (load_compressed(source, dtype=torch.float32).model if compressed else
                     AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32))
        ours = reference(torch.tensor([ids])).logits[0].numpy()
    tolerance = 5e-2 * max(1.0, np.abs(ours).max()) if compressed else 2e-2
    assert np.abs(theirs - ours)[17:].max() < tolerance and np.abs(theirs - ours).max() < tolerance


def test_gemma3_layouts_llama_cpp_cannot_hold_are_refused_in_one_line(tmp_path, capsys):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "g3", "gemma3_text")  # layers [sliding, full]; query_pre_attn_scalar 24
    assert main(["-q", "export", str(model), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama.cpp's Gemma 3 cannot hold this model's layer_types" in err[0]
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_of_neither_style_is_refused_not_written_wrong(tmp_path, capsys):
    """Byte fallback without "▁" spaces is neither GPT-2's byte-level BPE nor SentencePiece's: written as
    either, llama.cpp would split text wrongly."""
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "llama", "llama")
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert main(["-q", "export", str(model), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this model's is neither" in err[0]
    assert not (tmp_path / "m.gguf").exists()
