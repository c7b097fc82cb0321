import pytest
import torch

from layerwise.engine import LayerwiseCompressor, collect_hessians, discover_groups
from layerwise.capture import capture_block_inputs
from layerwise.errors import ModelError, RecipeError
from layerwise.hessian import report_rows
from layerwise.models import resolve_family
from layerwise.recipe import Recipe, Rule, recipe_from_dict
from layerwise.solvers import GPTQConfig

from conftest import FAMILY_KINDS, build_tiny_model


def windows(n=6, L=32, seed=0):
    return torch.randint(4, 4096, (n, L), generator=torch.Generator().manual_seed(seed))


def block_outputs(model, ids) -> list[torch.Tensor]:
    """Every block's output in one whole-model forward (forward hooks on the blocks)."""
    blocks = model.get_submodule(resolve_family(model).blocks)
    outputs = []
    handles = [b.register_forward_hook(lambda m, i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return outputs


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_streamed_blocks_equal_whole_model_forward(kind):
    """Each block is run on the arguments the real forward gives it: with 64-token windows past the
    16-token sliding windows, Gemma 2/3's full-attention layer needs its own mask (and Gemma 3 its
    global rope); with block 0's, layer 1 of Gemma 2 / Gemma 3 was off by up to 6.9 / 7.0."""
    model = build_tiny_model(kind, dtype=torch.float32)
    ids = windows(L=64)
    expected = block_outputs(model, ids)
    off = Recipe((Rule(".*", None),))
    streamed = {}
    LayerwiseCompressor(model, off, device="cpu", batch_size=4).compress(
        ids, on_block_output=lambda i, outs: streamed.__setitem__(i, torch.cat(outs))
    )
    assert len(streamed) == len(expected) == model.config.num_hidden_layers
    for i, out in enumerate(expected):
        assert (streamed[i] - out).abs().max() <= 1e-5, f"block {i}"


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_declared_groups_match_discovered_groups(kind):
    """The staged Hessians of a declared family use its groups: they must be what a forward shows."""
    model = build_tiny_model(kind, dtype=torch.float32)
    family = resolve_family(model)
    batch = capture_block_inputs(model, model.model.layers, windows(2), 2, torch.device("cpu"))[0]
    assert discover_groups(model.model.layers[0], 0, batch) == family.groups


def test_generic_fallback_compresses_unknown_family():
    model = build_tiny_model("llama", dtype=torch.float32)
    model.config.model_type = "my_llama_clone"  # not a declared family
    compressor = LayerwiseCompressor(model, Recipe.single(GPTQConfig(bits=4)), device="cpu")
    assert compressor.family.groups is None and compressor.family.name.startswith("generic")
    result = compressor.compress(windows())
    assert len(result.compressed) == 2 * 7


def test_staged_and_unstaged_both_beat_rtn_and_differ():
    base = build_tiny_model("llama", dtype=torch.float32)
    ids = windows(8)
    reports = {}
    for staged in (True, False):
        model = build_tiny_model("llama", dtype=torch.float32)
        r = LayerwiseCompressor(model, Recipe.single(GPTQConfig(bits=3)), device="cpu", staged=staged).compress(ids)
        reports[staged] = {x.name: x.rel_error for x in r.layers}
    # o_proj sees different inputs once q/k/v are compressed first
    name = "model.layers.0.self_attn.o_proj"
    assert reports[True][name] != reports[False][name]
    assert base is not None


def test_lm_head_untouched_unless_named():
    model = build_tiny_model("llama", dtype=torch.float32)
    head_before = model.lm_head.weight.clone()
    LayerwiseCompressor(model, Recipe.single(GPTQConfig(bits=4)), device="cpu").compress(windows())
    assert torch.equal(model.lm_head.weight, head_before)
    recipe = recipe_from_dict({"rules": [{"match": "lm_head", "config": {"method": "gptq", "bits": 8}},
                                         {"match": ".*", "config": {"method": "rtn", "bits": 4}}]})
    model = build_tiny_model("llama", dtype=torch.float32)
    result = LayerwiseCompressor(model, recipe, device="cpu").compress(windows())
    assert "lm_head" in result.compressed and result.compressed["lm_head"].bits == 8


def test_tied_lm_head_rule_is_an_error():
    model = build_tiny_model("qwen2", dtype=torch.float32)
    recipe = recipe_from_dict({"rules": [{"match": "lm_head", "config": {"method": "rtn", "bits": 8}}]})
    with pytest.raises(RecipeError, match="tied"):
        LayerwiseCompressor(model, recipe, device="cpu")


def test_block_size_not_dividing_is_caught_before_work():
    model = build_tiny_model("llama", dtype=torch.float32)  # intermediate 128, hidden 64
    with pytest.raises(RecipeError, match="block_size=48 does not divide the 64 input features"):
        LayerwiseCompressor(model, Recipe.single(GPTQConfig(bits=4, block_size=48)), device="cpu")


def test_model_without_block_list_is_a_clear_error():
    class NotADecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ModelError, match="cannot find the decoder blocks"):
        resolve_family(NotADecoder())


def test_same_seed_gives_identical_tensors():
    results = []
    for _ in range(2):
        model = build_tiny_model("llama", dtype=torch.float32)
        results.append(LayerwiseCompressor(model, Recipe.single(GPTQConfig(bits=3, block_size=32, act_order=True)),
                                           device="cpu").compress(windows()).compressed)
    for name in results[0]:
        assert torch.equal(results[0][name].codes, results[1][name].codes)
        assert torch.equal(results[0][name].scale, results[1][name].scale)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_early_stopped_forward_gives_the_same_hessians(kind):
    """Cutting the block's forward once a stage's inputs are seen must not change any Hessian."""
    model = build_tiny_model(kind, dtype=torch.float32)
    block = model.model.layers[0]
    batches = capture_block_inputs(model, model.model.layers, windows(4), 2, torch.device("cpu"))
    groups = resolve_family(model).groups
    for stage in [[g[0]] for g in groups] + [[g[0] for g in groups]]:
        cut = collect_hessians(block, 0, stage, batches, stop_early=True)
        full = collect_hessians(block, 0, stage, batches, stop_early=False)
        for name in stage:
            assert torch.equal(cut[name], full[name]), name
            assert cut[name].abs().sum() > 0


def test_early_stop_skips_the_rest_of_the_block():
    model = build_tiny_model("llama", dtype=torch.float32)
    block = model.model.layers[0]
    batches = capture_block_inputs(model, model.model.layers, windows(2), 2, torch.device("cpu"))
    calls = []
    handle = block.mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    collect_hessians(block, 0, ["self_attn.q_proj"], batches, stop_early=True)
    assert calls == []
    collect_hessians(block, 0, ["self_attn.q_proj"], batches, stop_early=False)
    assert calls == [1]
    handle.remove()


@pytest.mark.parametrize("dtype,expected", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_in_memory_model_keeps_its_dtype(dtype, expected):
    """After compress the model is back in its stored dtype (bfloat16 becomes float32: float16 codes
    are not bfloat16-exact), inside and outside the blocks, lm_head compressed or not."""
    model = build_tiny_model("llama", dtype=dtype)
    recipe = recipe_from_dict({"rules": [{"match": "lm_head", "config": {"method": "rtn", "bits": 8}},
                                         {"match": ".*", "config": {"method": "rtn", "bits": 4}}]})
    result = LayerwiseCompressor(model, recipe, device="cpu").compress(windows())
    assert {p.dtype for p in model.parameters()} == {expected}
    head = result.compressed["lm_head"].dequantize()
    assert torch.equal(model.lm_head.weight.to(torch.float16), head)


def test_data_free_recipe_streams_nothing_and_matches_the_streamed_weights(monkeypatch):
    """RTN / magnitude / k-means need no inputs: no block forward runs, the weights are the ones the
    streaming loop gives, and the report's error is the weight-space |ΔW|²/|W|²."""
    recipe = recipe_from_dict({"rules": [
        {"match": r"\.mlp\.", "config": {"method": "kmeans", "n_bits": 3}},
        {"match": "lm_head", "config": {"method": "rtn", "bits": 8}},
        {"match": ".*", "config": {"method": "magnitude", "nm": "2:4", "bits": 4}},
    ]})
    streamed = LayerwiseCompressor(build_tiny_model("llama", dtype=torch.float32), recipe, device="cpu").compress(
        windows(), on_block_output=lambda i, outs: None  # a block-output consumer forces the streaming loop
    )
    import layerwise.engine as engine

    monkeypatch.setattr(engine, "capture_block_inputs", lambda *a, **k: pytest.fail("data-free recipe streamed data"))
    model = build_tiny_model("llama", dtype=torch.float32)
    compressor = LayerwiseCompressor(model, recipe, device="cpu")
    assert not compressor.needs_data
    free = compressor.compress(None)
    assert free.compressed.keys() == streamed.compressed.keys()
    for name, cw in free.compressed.items():
        assert torch.equal(cw.dequantize(), streamed.compressed[name].dequantize()), name
    for r in free.layers:
        w = build_tiny_model("llama", dtype=torch.float32).get_submodule(r.name).weight
        rows = report_rows(w.shape[0])  # lm_head: 512 evenly spaced rows of the vocabulary
        expected = ((free.compressed[r.name].dequantize().float()[rows] - w[rows]) ** 2).sum() / (w[rows] ** 2).sum()
        assert r.error_space == "weight" and r.rel_error == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(RecipeError, match="calibration"):
        LayerwiseCompressor(model, Recipe.single(GPTQConfig(bits=4)), device="cpu").compress(None)
