"""The token embedding as a compressed layer: a recipe rule naming it (data-free methods only),
compressed before the capture, stored once in rest.safetensors (a tied output head is the same
tensor), decoded by decompress and loading bit for bit, `compress --embeddings 8|4`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import save_tiny_model
from layerwise.checkpoint import load_compressed, read_tensors
from layerwise.cli import main
from layerwise.pipeline import evaluate_perplexity

SMALL = ["--nsamples", "8", "--seqlen", "64", "--seed", "0", "--device", "cpu"]
EMBED = "model.embed_tokens"
BLOCKS = {"method": "gptq", "bits": 4, "block_size": 32}
RULES = {
    "rtn8": {"method": "rtn", "bits": 8},  # one scale and offset per token row
    "rtn4b32": {"method": "rtn", "bits": 4, "block_size": 32, "sym": True},
    "kmeans": {"method": "kmeans", "n_bits": 4, "granularity": "per_grouped_channel", "group_size": 1024},
}
KINDS = ("llama", "qwen2", "gemma3_text")  # untied; tied; tied with √hidden embedding scale


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb-models")
    return {kind: save_tiny_model(root / kind, kind) for kind in KINDS}


def write_recipe(path, embedding: dict | None, blocks: dict = BLOCKS):
    rules = ([{"match": "embed_tokens", "config": embedding}] if embedding else []) + [{"match": ".*", "config": blocks}]
    path.write_text(yaml.safe_dump({"rules": rules}))
    return path


def compress(model_dir, out, calib, *extra):
    return main(["-q", "compress", str(model_dir), "--out", str(out), "--calib", str(calib), *SMALL, *extra])


def check_checkpoint(path, tied: bool):
    """The embedding stored once, compressed, in rest.safetensors; loaded and decompressed bit for bit."""
    manifest = json.loads((path / "layerwise.json").read_text())
    entry = manifest["layers"][EMBED]
    assert entry["shard"] == "rest.safetensors" and entry["report"]["error_space"] == "weight"
    with safe_open(path / "rest.safetensors", "pt") as f:
        stored = set(f.keys())
    assert f"{EMBED}.weight" not in stored and ("lm_head.weight" in stored) == (not tied)
    _, compressed = read_tensors(path)
    expected = compressed[EMBED].dequantize()
    model = load_compressed(path, dtype=torch.float16).model
    assert torch.equal(model.model.embed_tokens.weight.view(torch.int16), expected.view(torch.int16))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return expected


def check_decompressed(path, dense, expected, calib):
    assert main(["-q", "decompress", str(path), "--out", str(dense)]) == 0
    with safe_open(dense / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor(f"{EMBED}.weight").view(torch.int16), expected.view(torch.int16))
    ppl = [evaluate_perplexity(target, str(calib), seqlen=64)["ppl"] for target in (path, dense)]
    assert ppl[0] == ppl[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", list(RULES))
def test_embedding_rule_round_trips(models, calib_text_file, tmp_path, kind, rule):
    out = tmp_path / "ck"
    recipe = write_recipe(tmp_path / "recipe.yaml", RULES[rule])
    assert compress(models[kind], out, calib_text_file, "--recipe", str(recipe)) == 0
    expected = check_checkpoint(out, tied=kind != "llama")
    check_decompressed(out, tmp_path / "dense", expected, calib_text_file)


@pytest.mark.parametrize("bits, sym, clip", [(8, True, False), (4, False, True)])
def test_embeddings_flag_is_rtn_per_block_of_32(models, calib_text_file, tmp_path, bits, sym, clip):
    out = tmp_path / "ck"
    assert compress(models["qwen2"], out, calib_text_file, "--method", "rtn", "--bits", "4", "--embeddings",
                    str(bits)) == 0
    manifest = json.loads((out / "layerwise.json").read_text())
    assert manifest["recipe"]["rules"][0] == {"match": "embed_tokens", "config": {
        **manifest["recipe"]["rules"][0]["config"], "method": "rtn", "bits": bits, "block_size": 32, "sym": sym,
        "mse_clip": clip}}
    _, compressed = read_tensors(out)
    cw = compressed[EMBED]
    assert cw.scheme == "affine" and cw.bits == bits and tuple(cw.scale.shape) == (4096, 64 // 32)
    check_checkpoint(out, tied=True)


def test_blocks_calibrate_on_the_compressed_embedding(models, calib_text_file, tmp_path):
    """The block shards equal those of the same model whose embedding already holds the dequantized
    values, compressed without the embedding rule: the capture saw the compressed embedding."""
    with_rule = tmp_path / "with"
    assert compress(models["gemma3_text"], with_rule, calib_text_file, "--method", "gptq", "--bits", "4",
                    "--block-size", "32", "--embeddings", "4") == 0
    _, compressed = read_tensors(with_rule)
    source = save_tiny_model(tmp_path / "pre", "gemma3_text")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16)
    model.model.embed_tokens.weight.data = compressed[EMBED].dequantize()
    model.save_pretrained(source, safe_serialization=True)
    without = tmp_path / "without"
    assert compress(source, without, calib_text_file, "--method", "gptq", "--bits", "4", "--block-size", "32") == 0
    shards = [json.loads((p / "layerwise.json").read_text())["shards"] for p in (with_rule, without)]
    blocks = [{k: v for k, v in s.items() if k.startswith("block-")} for s in shards]
    assert blocks[0] == blocks[1] and len(blocks[0]) == 2


@pytest.mark.parametrize("config, problem", [
    ({"method": "gptq", "bits": 4}, "model.embed_tokens: method gptq calibrates on the layer's inputs"),
    ({"method": "rtn", "bits": 4, "block_size": 48}, "block_size=48"),
])
def test_embedding_rule_refusals_are_one_line(models, calib_text_file, tmp_path, capsys, config, problem):
    recipe = write_recipe(tmp_path / "recipe.yaml", config)
    assert compress(models["llama"], tmp_path / "ck", calib_text_file, "--recipe", str(recipe)) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ck").exists()


def test_tied_lm_head_rule_points_at_the_embedding(models, calib_text_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"rules": [{"match": "lm_head", "config": {"method": "rtn", "bits": 8}}]}))
    assert compress(models["qwen2"], tmp_path / "ck", calib_text_file, "--recipe", str(recipe)) == 2
    assert "a rule naming embed_tokens compresses the embedding" in capsys.readouterr().err


def test_catch_all_leaves_the_embedding_alone(models, calib_text_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"rules": [{"match": ".*", "config": {"method": "rtn", "bits": 4}}]}))
    assert compress(models["qwen2"], tmp_path / "ck", calib_text_file, "--recipe", str(recipe)) == 0
    assert EMBED not in json.loads((tmp_path / "ck" / "layerwise.json").read_text())["layers"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_size_budget_chooses_the_embedding_too(models, calib_text_file, tmp_path, kind):
    """A menu for the embedding is one more layer of the budget: measured in weight space, weighed by
    the loss scales of the tokens that read each row (and of the tied head's logits), chosen, written."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"rules": [
        {"match": "embed_tokens", "menu": [{"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 4}]},
        {"match": ".*", "menu": [{"method": "rtn", "bits": 4}, {"method": "rtn", "bits": 8}]}]}))
    out = tmp_path / "ck"
    assert compress(models[kind], out, calib_text_file, "--target-bits", "6", "--recipe", str(recipe)) == 0
    manifest = json.loads((out / "layerwise.json").read_text())
    assert EMBED in manifest["budget"]["layers"] and manifest["budget"]["bits_per_weight"] <= 6
    assert manifest["recipe"]["rules"][0]["match"] == "^model\\.embed_tokens$"
    check_checkpoint(out, tied=kind != "llama")


def test_embedding_loss_scales_follow_the_tokens(models):
    """Untied: a row no calibration token reads has scale 0; tied: every row is read by the head."""
    from transformers import AutoModelForCausalLM

    from layerwise.budget.loss_scale import output_fisher_scales

    windows = torch.randint(10, 200, (2, 32))
    for kind, tied in (("llama", False), ("qwen2", True)):
        model = AutoModelForCausalLM.from_pretrained(models[kind], dtype=torch.float32)
        scales = output_fisher_scales(model, [EMBED, "model.layers.0.mlp.down_proj"], windows, device="cpu")
        s = scales[EMBED]
        assert s.shape == (4096,) and bool((s[windows[:, :-1].unique()] > 0).all())  # the last token predicts nothing
        assert bool((s[1000:] > 0).all()) == tied and bool((s[1000:] == 0).all()) != tied


def test_in_memory_compress_returns_the_embedding_first():
    """Without a writer the result holds the embedding with the block layers, reported first in weight
    space, and the model (and its tied head) computes with the dequantized table."""
    from conftest import build_tiny_model
    from layerwise.engine import LayerwiseCompressor
    from layerwise.recipe import recipe_from_dict

    model = build_tiny_model("qwen2")
    recipe = recipe_from_dict({"rules": [{"match": "embed_tokens", "config": RULES["rtn4b32"]},
                                         {"match": ".*", "config": {"method": "rtn", "bits": 4}}]})
    result = LayerwiseCompressor(model, recipe, device="cpu").compress(None)
    assert result.layers[0].name == EMBED and result.layers[0].error_space == "weight"
    assert set(result.outside) == {EMBED} and EMBED in result.compressed
    expected = result.compressed[EMBED].dequantize()
    assert torch.equal(model.lm_head.weight.view(torch.int16), expected.view(torch.int16))
