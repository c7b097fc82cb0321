"""StatefulCausalLM: a decoder forward with its KV cache in registered buffers, for Core ML export.

The wrapper owns the smallest forward that reproduces a Hugging Face Llama / Mistral / Qwen2
model: it reuses the model's own modules (so its parameter names are the HF names, e.g.
``model.layers.0.self_attn.q_proj.weight``) but not the HF attention code, whose cache object,
mask helpers and explicit ``scale`` argument do not convert into a stateful iOS18 program.

Inputs (one sequence, batch 1):
    input_ids:   [1, q_len] int
    causal_mask: [1, 1, q_len, past + q_len] float, additive (0 = attend, -inf = masked)
The past length is ``causal_mask.shape[-1] - q_len``; the new keys/values land in the cache at
``[past, past + q_len)``.

State (float16 by default; iOS18 states are float16):
    k_cache, v_cache: [layers, 1, kv_heads, context, head_dim]
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.errors import ModelError

log = logging.getLogger(__name__)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class StatefulCausalLM(nn.Module):
    """Stateful decoder over a loaded HF causal LM (Llama, Mistral, Qwen2; MHA, GQA or MQA).

    model: the HF model; its modules are shared, not copied.
    context: cache length (positions 0 .. context-1).
    cache_dtype: float16 for export; float32 for exact parity tests against HF.
    last_logits_only: return logits of the last position only ([1, 1, vocab]).
    """

    def __init__(
        self,
        model: nn.Module,
        context: int = 512,
        cache_dtype: torch.dtype = torch.float16,
        last_logits_only: bool = False,
    ):
        super().__init__()
        family = type(model).__name__
        if family not in SUPPORTED:
            raise ModelError(
                f"cannot export {family}: the stateful Core ML wrapper supports {', '.join(SUPPORTED)}"
            )
        if context < 2:
            raise ModelError(f"context={context} must be at least 2 tokens")
        cfg = model.config
        self.model = model.model  # embed_tokens, layers, norm (names stay the HF names)
        self.lm_head = model.lm_head
        attn = self.model.layers[0].self_attn
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        if abs(getattr(attn, "scaling", self.head_dim**-0.5) - self.head_dim**-0.5) > 1e-9:
            raise ModelError(f"{family} scales attention by {attn.scaling}, not 1/sqrt(head_dim); not exportable")
        self.context = context
        self.last_logits_only = last_logits_only
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and window < context:
            log.warning(
                "%s uses a %d-token sliding window but the cache holds %d tokens: "
                "the causal_mask you pass must implement the window", family, window, context
            )

        cos, sin = _rope_tables(self.model.rotary_emb, context, self.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)  # [context, head_dim]
        self.register_buffer("rope_sin", sin, persistent=False)
        shape = (len(self.model.layers), 1, self.num_kv_heads, context, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))

    @property
    def state_shape(self) -> tuple[int, ...]:
        """[layers, 1, kv_heads, context, head_dim]"""
        return tuple(self.k_cache.shape)

    def reset_cache(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        """input_ids: [1, q_len] int; causal_mask: [1, 1, q_len, end] → logits [1, q_len|1, vocab]."""
        q_len = input_ids.shape[-1]
        end = causal_mask.shape[-1]
        past = end - q_len
        hidden = self.model.embed_tokens(input_ids)  # (1, q, hidden)
        cos = self.rope_cos[past:end]  # (q, hd)
        sin = self.rope_sin[past:end]
        mask = causal_mask.to(hidden.dtype)
        for i, layer in enumerate(self.model.layers):
            x = _rms_norm(layer.input_layernorm, hidden)
            hidden = hidden + self._attention(i, layer.self_attn, x, mask, cos, sin, past, end)
            x = _rms_norm(layer.post_attention_layernorm, hidden)
            mlp = layer.mlp
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        hidden = _rms_norm(self.model.norm, hidden)
        if self.last_logits_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)

    def _attention(self, i, attn, x, mask, cos, sin, past, end):
        """x: [1, q, hidden] → [1, q, hidden]; writes cache[i, :, :, past:end]."""
        hd = self.head_dim
        q = attn.q_proj(x).view(1, -1, self.num_heads, hd).transpose(1, 2)  # (1, H, q, hd)
        k = attn.k_proj(x).view(1, -1, self.num_kv_heads, hd).transpose(1, 2)  # (1, KV, q, hd)
        v = attn.v_proj(x).view(1, -1, self.num_kv_heads, hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # write by slice assignment on the registered buffers themselves (never a view kept around)
        self.k_cache[i, :, :, past:end] = k.to(self.k_cache.dtype)
        self.v_cache[i, :, :, past:end] = v.to(self.v_cache.dtype)
        k = self.k_cache[i, :, :, :end].to(q.dtype)  # (1, KV, end, hd)
        v = self.v_cache[i, :, :, :end].to(q.dtype)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # explicit GQA/MQA head repeat: (1, KV, end, hd) → (1, H, end, hd)
            k = torch.cat([k[:, :, None]] * rep, dim=2).reshape(1, self.num_heads, -1, hd)
            v = torch.cat([v[:, :, None]] * rep, dim=2).reshape(1, self.num_heads, -1, hd)
        # no `scale`: the default 1/sqrt(hd) is HF's, and only then does the iOS18 SDPA op appear
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, H, q, hd)
        out = out.transpose(1, 2).reshape(1, -1, self.num_heads * hd)
        return attn.o_proj(out)


def causal_mask(q_len: int, past: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask [1, 1, q_len, past + q_len]: query i sees cache positions <= past + i."""
    mask = torch.full((q_len, past + q_len), float("-inf"), dtype=dtype)
    return torch.triu(mask, diagonal=past + 1)[None, None]


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF RMSNorm over the last dim (x: [..., hidden]); one `rms_norm` op for the converter."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def _rope_tables(rotary_emb: nn.Module, context: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [context, head_dim] float32 from the model's own rotary module (any rope scaling).

    A table slice keeps the angles exact in a float16 program (an in-graph position × frequency
    product loses whole radians at long positions in float16).
    """
    positions = torch.arange(context)[None]  # (1, context)
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary_emb(probe, positions)
    if cos.shape[-1] != head_dim:
        raise ModelError(f"rotary tables have {cos.shape[-1]} dims but heads have {head_dim}")
    return cos[0].float(), sin[0].float()
