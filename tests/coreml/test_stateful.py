"""StatefulCausalLM (the export wrapper) against Hugging Face's own forward, in float32."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


from conftest import FAMILY_KINDS, FAMILY_VARIANTS, build_tiny_model
from layerwise.errors import ModelError
from layerwise.models.stateful import StatefulCausalLM, causal_mask

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
P, K = 6, 4  # prefill tokens, decode steps


def tiny(family: str, kv_heads: int) -> torch.nn.Module:
    """A random tiny model of `family` built from a config (float32, eval)."""
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=kv_heads))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=kv_heads, sliding_window=None))
    else:  # Qwen2: q/k/v biases always on; tied embeddings
        cfg = Qwen2Config(**SMALL, num_key_value_heads=kv_heads, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random, non-zero biases so they matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


@torch.no_grad()
def hf_and_wrapper_logits(model, wrapper, ids: torch.Tensor):
    """Prefill ids[:, :P] then decode one token at a time; both sides' logits per step."""
    cache = DynamicCache(config=model.config)
    pairs = [(model(ids[:, :P], past_key_values=cache, use_cache=True).logits,
              wrapper(ids[:, :P].int(), causal_mask(P)))]
    for t in range(P, ids.shape[1]):
        ref = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
        pairs.append((ref, wrapper(ids[:, t : t + 1].int(), causal_mask(1, past=t))))
    return pairs


@pytest.mark.parametrize(
    "family,kv_heads",
    [("llama", 2), ("llama", 1), ("llama", 4), ("mistral", 2), ("mistral", 1), ("qwen2", 2), ("qwen2", 1)],
)
def test_wrapper_matches_hf_prefill_then_decode(family, kv_heads):
    model = tiny(family, kv_heads)
    wrapper = StatefulCausalLM(model, context=32, cache_dtype=torch.float32).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (1, P + K), generator=torch.Generator().manual_seed(1))
    for step, (ref, out) in enumerate(hf_and_wrapper_logits(model, wrapper, ids)):
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-4, f"step {step}"


def test_qwen2_tied_embeddings_share_one_parameter():
    wrapper = StatefulCausalLM(tiny("qwen2", 2), context=16)
    assert wrapper.lm_head.weight is wrapper.model.embed_tokens.weight
    names = {n for n, _ in wrapper.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.bias" in names  # HF names are kept


def test_state_buffers_are_float16_with_cache_geometry():
    wrapper = StatefulCausalLM(tiny("llama", 2), context=48)
    buffers = dict(wrapper.named_buffers())
    for name in ("k_cache", "v_cache"):
        assert buffers[name].dtype == torch.float16
        assert tuple(buffers[name].shape) == (2, 1, 2, 48, 16)  # layers, batch, kv heads, ctx, hd
    assert wrapper.state_shape == (2, 1, 2, 48, 16)


def test_float16_cache_stays_close_to_hf():
    model = tiny("llama", 2)
    wrapper = StatefulCausalLM(model, context=32).eval()  # float16 states, float32 compute
    ids = torch.randint(0, SMALL["vocab_size"], (1, P + K), generator=torch.Generator().manual_seed(2))
    for ref, out in hf_and_wrapper_logits(model, wrapper, ids):
        assert (out - ref).abs().max().item() < 1e-2
        assert out.dtype == torch.float32


def test_chunked_prefill_equals_one_prefill():
    """Writing the cache in two chunks gives the same last logits as one chunk."""
    model = tiny("mistral", 1)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(3)).int()
    whole = StatefulCausalLM(model, context=16, cache_dtype=torch.float32)
    parts = StatefulCausalLM(model, context=16, cache_dtype=torch.float32)
    with torch.no_grad():
        ref = whole(ids, causal_mask(9))[:, -1]
        parts(ids[:, :5], causal_mask(5))
        out = parts(ids[:, 5:], causal_mask(4, past=5))[:, -1]
    assert (out - ref).abs().max().item() <= 1e-5


def test_trace_with_two_tokens_generalizes_to_other_lengths():
    """A trace taken at q_len 2 (past 1) must run q_len 1 and 5 exactly like eager code."""
    model = tiny("llama", 1)
    eager = StatefulCausalLM(model, context=16, cache_dtype=torch.float32).eval()
    traced_src = StatefulCausalLM(model, context=16, cache_dtype=torch.float32).eval()
    with torch.no_grad():
        traced = torch.jit.trace(traced_src, (torch.zeros(1, 2, dtype=torch.int32), causal_mask(2, past=1)))
        traced_src.reset_cache()
        ids = torch.randint(0, SMALL["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(4)).int()
        for start, stop in ((0, 5), (5, 6), (6, 7)):
            mask = causal_mask(stop - start, past=start)
            ref = eager(ids[:, start:stop], mask)
            out = traced(ids[:, start:stop], mask)
            assert (out - ref).abs().max().item() <= 1e-6


def test_last_logits_only():
    wrapper = StatefulCausalLM(tiny("llama", 2), context=16, last_logits_only=True)
    with torch.no_grad():
        out = wrapper(torch.zeros(1, 3, dtype=torch.int32), causal_mask(3))
    assert out.shape == (1, 1, SMALL["vocab_size"])


def test_causal_mask_shape_and_values():
    mask = causal_mask(2, past=3)
    assert mask.shape == (1, 1, 2, 5)
    assert torch.equal(mask[0, 0].isinf(), torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool))


def test_unsupported_family_names_the_supported_ones():
    with pytest.raises(ModelError, match="supported families are llama, mistral, qwen2, qwen3, gemma"):
        StatefulCausalLM(torch.nn.Linear(2, 2))


# ---- every declared family (tests/conftest.py FAMILY_KINDS) and the trait variants ---------------
EVERY_FAMILY = {**{kind: (kind, {}) for kind in FAMILY_KINDS}, **FAMILY_VARIANTS}
PREFILL, DECODE, CONTEXT = 40, 4, 48  # the prefill runs past the 16-token sliding windows


def family_model(name: str) -> torch.nn.Module:
    kind, extra = EVERY_FAMILY[name]
    return build_tiny_model(kind, dtype=torch.float32, **extra)


@torch.no_grad()
def prefill_then_decode(wrapper, ids: torch.Tensor, mask=causal_mask) -> torch.Tensor:
    """Logits [1, PREFILL + DECODE, vocab]: one prefill of PREFILL tokens, then one token per step."""
    wrapper.reset_cache()
    outs = [wrapper(ids[:, :PREFILL].int(), mask(PREFILL))]
    for t in range(PREFILL, PREFILL + DECODE):
        outs.append(wrapper(ids[:, t : t + 1].int(), mask(1, past=t)))
    return torch.cat(outs, dim=1)


def family_ids(model, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", EVERY_FAMILY)
def test_every_family_matches_hf_past_the_window(name):
    """float32 cache: the wrapper fed the README's plain causal mask gives HF's full-sequence logits
    (sliding windows, soft-caps, multipliers, q/k norms, fused projections, rope variants)."""
    model = family_model(name)
    wrapper = StatefulCausalLM(model, context=CONTEXT, cache_dtype=torch.float32).eval()
    ids = family_ids(model)
    with torch.no_grad():
        ref = model(ids).logits
    out = prefill_then_decode(wrapper, ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3_text", "qwen3_window", "phi3_longrope"])
def test_sliding_window_lives_in_the_program(name):
    """The window changes the logits past 16 tokens and the plain causal mask already gets it right;
    where every layer slides, a caller-built window mask gives the same logits (masking is idempotent)."""
    model = family_model(name)
    wrapper = StatefulCausalLM(model, context=CONTEXT, cache_dtype=torch.float32).eval()
    ids = family_ids(model, seed=2)
    window = next(w for w in wrapper.windows if w)

    def window_mask(q_len, past=0):
        rows, keys = past + torch.arange(q_len)[:, None], torch.arange(past + q_len)[None, :]
        return causal_mask(q_len, past).masked_fill(rows - keys >= window, float("-inf"))

    plain = prefill_then_decode(wrapper, ids)
    if all(wrapper.windows):
        assert torch.allclose(prefill_then_decode(wrapper, ids, window_mask), plain, atol=1e-5)
    wrapper.window_bands = tuple(None for _ in wrapper.windows)  # what an unwindowed program would give
    assert (prefill_then_decode(wrapper, ids) - plain)[:, window:].abs().max().item() > 1e-2


def test_softcap_layers_are_named_and_scales_folded():
    gemma2 = StatefulCausalLM(family_model("gemma2"), context=16)
    assert gemma2.attention_kinds == ("softcap", "softcap") and gemma2.windows == (16, None)
    assert gemma2.required_ops() == ("read_state", "coreml_update_state", "tanh")
    granite = StatefulCausalLM(family_model("granite"), context=16)
    assert granite.attention_kinds == ("sdpa", "sdpa")
    assert granite.q_scale == pytest.approx(0.0156 * granite.head_dim**0.5)
