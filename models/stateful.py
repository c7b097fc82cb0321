"""StatefulCausalLM: a decoder forward with its KV cache in registered buffers, for Core ML export.

The wrapper owns the smallest forward that reproduces a Hugging Face decoder of any declared family
(`families.py`): it reuses the model's own modules (so its parameter names are the HF names, e.g.
``model.layers.0.self_attn.q_proj.weight``) but not the HF attention code, whose cache object,
mask helpers and explicit ``scale`` argument do not convert into a stateful iOS18 program. What
differs between families (norms, multipliers, soft-caps, windows, rope, fused projections) is read
from the family entry and the HF config; nothing here tests ``model_type``.

Inputs (one sequence, batch 1):
    input_ids:   [1, q_len] int
    causal_mask: [1, 1, q_len, past + q_len] float, additive (0 = attend, -inf = masked): the plain
                 causal mask. The past length is ``causal_mask.shape[-1] - q_len``; the new
                 keys/values land in the cache at ``[past, past + q_len)``.
Sliding windows live in the program: a sliding layer adds its own window band (query position
minus key position >= window → masked), computed from the past length, to the mask it is given.
A caller that already passes a window mask gets the same result (masking twice is idempotent).

State (float16 by default; iOS18 states are float16):
    k_cache, v_cache: [layers, 1, kv_heads, context, head_dim]

The residual stream is carried ÷ the family's `residual_divisor` (a power of two; 16 for Gemma 2/3,
whose residual outgrows float16's 65504: Gemma 3 270M reaches 1.04e5): folded into the embedding multiplier, the post-norm weights
and the eps of the norms that read the stream, so it adds no op and changes no float16 significand.
"""

from __future__ import annotations

import json
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.errors import ModelError

from .families import Family, NormKind, QKNorm, exportable_family, get_module

log = logging.getLogger(__name__)

SDPA, SOFTCAP = "sdpa", "softcap"  # per-layer attention kinds (metadata)


class StatefulCausalLM(nn.Module):
    """Stateful decoder over a loaded HF causal LM of a declared family (MHA, GQA or MQA).

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
        family = exportable_family(model)
        if context < 2:
            raise ModelError(f"context={context} must be at least 2 tokens")
        cfg = model.config
        self.family: Family = family
        # the HF root's children under their own names, so the family's paths (and the parameter
        # names the converter sees) are the HF ones: model.embed_tokens, model.layers, model.norm
        self.model = model.model
        self.lm_head = get_module(model, family.lm_head)
        attn = self.layers[0].self_attn
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.context = context
        self.last_logits_only = last_logits_only
        self.eps = float(getattr(cfg, family.norm_eps))
        self.act = _activation(getattr(cfg, family.activation))

        def scalar(spec):
            return None if spec is None else spec.value(cfg)

        self.embed_scale = scalar(family.embed_scale)
        if self.embed_scale is not None:  # HF rounds it to the embedding dtype (Gemma's normalizer)
            self.embed_scale = torch.tensor(self.embed_scale, dtype=self.embed_tokens.weight.dtype).item()
        self.residual_scale = scalar(family.residual_scale)
        self._divide_residual(family.residual_divisor)
        self.logit_scale = scalar(family.logit_scale)
        attention_scale = scalar(family.attention_scale)
        # SDPA applies 1/sqrt(hd); any other scale is folded into q so SDPA's `scale` stays unset
        self.q_scale = None if attention_scale is None else attention_scale * math.sqrt(self.head_dim)
        self.attention_scale = self.head_dim**-0.5 if attention_scale is None else attention_scale
        self.attn_softcap, self.final_softcap = family.softcap(cfg)
        self.windows = family.layer_windows(cfg)  # the model's (metadata)
        # what the program applies: a window as long as the cache cannot hide anything
        self.window_bands = tuple(w if w and w < context else None for w in self.windows)
        self.attention_kinds = tuple(SOFTCAP if self.attn_softcap else SDPA for _ in self.layers)
        self.rope_keys = family.rope_keys(cfg)

        rotary = get_module(model, family.rotary)  # used once for the tables, not kept
        for key in sorted(set(self.rope_keys), key=str):
            cos, sin = _rope_tables(rotary, context, self.head_dim, key)
            self.register_buffer(_rope_name("cos", key), cos, persistent=False)  # [context, rotary_dim]
            self.register_buffer(_rope_name("sin", key), sin, persistent=False)
            # a python int (None = every dim) so the trace holds no shape comparison
            self.rotary_dim = cos.shape[-1] if cos.shape[-1] < self.head_dim else None  # Phi-3 partial_rotary_factor
        if any(self.window_bands):  # key/query positions for the in-program window band
            self.register_buffer("positions", torch.arange(context, dtype=torch.float32), persistent=False)
        shape = (len(self.layers), 1, self.num_kv_heads, context, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))

    @property
    def layers(self) -> nn.ModuleList:
        return get_module(self, self.family.blocks)

    @property
    def embed_tokens(self) -> nn.Module:
        return get_module(self, self.family.embeddings)

    @property
    def final_norm(self) -> nn.Module:
        return get_module(self, self.family.final_norm)

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
        hidden = F.embedding(input_ids, self.embed_tokens.weight)  # (1, q, hidden), ÷ residual_divisor below
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        mask = causal_mask.to(hidden.dtype)
        masks = {None: mask}
        for window in dict.fromkeys(w for w in self.window_bands if w is not None):  # not a set: same bytes each run
            masks[window] = mask + self._window_band(window, past, end).to(hidden.dtype)
        ropes = {key: (getattr(self, _rope_name("cos", key))[past:end], getattr(self, _rope_name("sin", key))[past:end])
                 for key in dict.fromkeys(self.rope_keys)}
        norms = self.family.block_norms
        for i, layer in enumerate(self.layers):
            x = self._norm(layer, norms.attn_in, hidden, self.residual_eps)
            a = self._attention(i, layer, x, masks[self.window_bands[i]], *ropes[self.rope_keys[i]], past, end)
            hidden = hidden + self._branch_out(layer, norms.attn_out, a)
            x = self._norm(layer, norms.mlp_in, hidden, self.residual_eps)
            hidden = hidden + self._branch_out(layer, norms.mlp_out, self._mlp(layer, x))
        hidden = _norm(self.family.norm, self.final_norm, hidden, self.residual_eps)
        if self.last_logits_only:
            hidden = hidden[:, -1:]
        logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _norm(self, layer, name, x, eps, divisor=1):
        return x if name is None else _norm(self.family.norm, get_module(layer, name), x, eps, divisor)

    def _divide_residual(self, s: int) -> None:
        """Carry the residual stream ÷ s (a power of two): the embedding multiplier and what each
        branch adds (post-norm weights, else the residual multiplier) are ÷ s, and the norms reading
        the stream take eps ÷ s², so norm(h / s) == norm(h). Every float16 value keeps its
        significand, so the program computes the unscaled numbers ÷ s exactly while they stay
        normal (Family.residual_divisor: 16 for Gemma 2/3), and h may reach 65504·s."""
        self.residual_divisor = s
        self.residual_eps = self.eps / s**2  # exact: a power of four
        self.post_norm_divisor = 1  # what _branch_out's post-norms divide their weights by
        if s == 1:  # nothing traced: the program of every other family is as before
            return
        self.embed_scale /= s
        if divided_norms(self.family):
            self.post_norm_divisor = s
        else:  # no post-norm on both branches: the family has a residual multiplier (Family checks)
            self.residual_scale /= s
        if math.sqrt(self.residual_eps) < 2.0**-14:  # _rms_norm's √eps / max|h|: a float16 subnormal
            log.warning("residual ÷%d: √eps %.3g is below float16's normal range; the norms' eps is "
                        "rounded (harmless next to mean(h²))", s, math.sqrt(self.residual_eps))

    def required_ops(self) -> tuple[str, ...]:
        """MIL ops the converted program must hold for this model to run as designed."""
        ops = ["read_state", "coreml_update_state"]
        if SDPA in self.attention_kinds:
            ops.append("scaled_dot_product_attention")
        if SOFTCAP in self.attention_kinds or self.final_softcap:
            ops.append("tanh")
        return tuple(ops)

    def export_metadata(self) -> dict[str, str]:
        """What an app must know about the program's attention (package metadata, all strings)."""
        return {
            "layerwise.family": self.family.name,
            "layerwise.traits": ",".join(self.family.traits(self.model.config)),
            "layerwise.layer_windows": json.dumps(list(self.windows)),
            "layerwise.attention_kinds": json.dumps(
                ["sliding" if w else "full" for w in self.windows]),
            "layerwise.attention_ops": json.dumps(list(self.attention_kinds)),
            "layerwise.mask": "plain causal mask; sliding windows are applied inside the program",
        }

    def _branch_out(self, layer, norm_name, out):
        """A branch's output as added to the residual stream: post-norm (sandwich / OLMo 2), multiplier."""
        out = self._norm(layer, norm_name, out, self.eps, self.post_norm_divisor)
        return out if self.residual_scale is None else out * self.residual_scale

    def _window_band(self, window: int, past, end) -> torch.Tensor:
        """[q, end] additive band: -inf where query position − key position >= window (HF's sliding mask)."""
        keys = self.positions[:end]
        queries = self.positions[past:end]
        far = (queries[:, None] - keys[None, :]) >= window
        return torch.where(far, torch.full_like(far, float("-inf"), dtype=keys.dtype), torch.zeros_like(keys))

    def _projections(self, layer, x):
        """q [1, q, H·hd], k, v [1, q, KV·hd] from separate or fused (Phi-3 qkv_proj) linears."""
        spec = self.family.attention
        if spec.qkv:
            qkv = get_module(layer, spec.qkv)(x)
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return qkv[..., :nq], qkv[..., nq : nq + nkv], qkv[..., nq + nkv :]
        return get_module(layer, spec.q)(x), get_module(layer, spec.k)(x), get_module(layer, spec.v)(x)

    def _attention(self, i, layer, x, mask, cos, sin, past, end):
        """x: [1, q, hidden] → [1, q, hidden]; writes cache[i, :, :, past:end]."""
        hd, spec, family = self.head_dim, self.family.attention, self.family
        q, k, v = self._projections(layer, x)
        if family.qk_norm is QKNorm.FULL_WIDTH:  # OLMo 2: over all heads, before the split
            q = _norm(family.norm, get_module(layer, spec.q_norm), q, self.eps)
            k = _norm(family.norm, get_module(layer, spec.k_norm), k, self.eps)
        q = q.view(1, -1, self.num_heads, hd)
        k = k.view(1, -1, self.num_kv_heads, hd)
        if family.qk_norm is QKNorm.PER_HEAD:  # Qwen3, Gemma 3: per head, before rope
            q = _norm(family.norm, get_module(layer, spec.q_norm), q, self.eps)
            k = _norm(family.norm, get_module(layer, spec.k_norm), k, self.eps)
        q = _rotate(q.transpose(1, 2), cos, sin, self.rotary_dim)  # (1, H, q, hd)
        k = _rotate(k.transpose(1, 2), cos, sin, self.rotary_dim)  # (1, KV, q, hd)
        v = v.view(1, -1, self.num_kv_heads, hd).transpose(1, 2)
        # write by slice assignment on the registered buffers themselves (never a view kept around)
        self.k_cache[i, :, :, past:end] = k.to(self.k_cache.dtype)
        self.v_cache[i, :, :, past:end] = v.to(self.v_cache.dtype)
        k = self.k_cache[i, :, :, :end].to(q.dtype)  # (1, KV, end, hd)
        v = self.v_cache[i, :, :, :end].to(q.dtype)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # explicit GQA/MQA head repeat: (1, KV, end, hd) → (1, H, end, hd)
            k = torch.cat([k[:, :, None]] * rep, dim=2).reshape(1, self.num_heads, -1, hd)
            v = torch.cat([v[:, :, None]] * rep, dim=2).reshape(1, self.num_heads, -1, hd)
        if self.attention_kinds[i] == SOFTCAP:  # tanh between q·k and softmax: no fused op can do it
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.attention_scale
            scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
            out = torch.matmul(torch.softmax(scores + mask, dim=-1), v)
        else:
            if self.q_scale is not None:
                q = q * self.q_scale
            # no `scale`: only then does the iOS18 SDPA op appear
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, H, q, hd)
        out = out.transpose(1, 2).reshape(1, -1, self.num_heads * hd)
        return get_module(layer, spec.o)(out)

    def _mlp(self, layer, x):
        spec = self.family.mlp
        if spec.gate_up:  # Phi-3: one linear, rows [gate | up]
            gate, up = get_module(layer, spec.gate_up)(x).chunk(2, dim=-1)
        else:
            gate, up = get_module(layer, spec.gate)(x), get_module(layer, spec.up)(x)
        return get_module(layer, spec.down)(self.act(gate) * up)


def divided_norms(family: Family) -> tuple[str, ...]:
    """Norms (relative to a block) whose weights the export divides by the family's residual divisor."""
    norms = family.block_norms
    if family.residual_divisor == 1 or not (norms.attn_out and norms.mlp_out):
        return ()
    return norms.attn_out, norms.mlp_out


def causal_mask(q_len: int, past: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask [1, 1, q_len, past + q_len]: query i sees cache positions <= past + i."""
    mask = torch.full((q_len, past + q_len), float("-inf"), dtype=dtype)
    return torch.triu(mask, diagonal=past + 1)[None, None]


def _norm(kind: NormKind, norm: nn.Module, x: torch.Tensor, eps: float, divisor: int = 1) -> torch.Tensor:
    """The family's norm over the last dim of x, its output ÷ divisor (folded into the weight: a
    constant the converter computes once)."""
    def fold(t):
        return t if t is None or divisor == 1 else t * (1.0 / divisor)

    if kind is NormKind.RMS:
        return _rms_norm(x, fold(norm.weight), eps)
    if kind is NormKind.RMS_ONE_PLUS:  # Gemma stores w − 1
        return _rms_norm(x, fold(1.0 + norm.weight), eps)
    return F.layer_norm(x, (x.shape[-1],), fold(norm.weight), fold(getattr(norm, "bias", None)), eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · w, computed on x / max|x| so that x² cannot overflow float16.

    Not F.rms_norm: coremltools lowers it with the same max rescaling but adds eps to the rescaled
    mean, i.e. uses eps·max² instead of eps — wrong wherever mean(x²) is not ≫ eps (OLMo 2's
    post-norms on small branch outputs). Here eps is rescaled too: (√eps / m)², a tensor ÷ tensor
    (a python scalar ÷ tensor becomes MIL `inverse`, whose own epsilon 1e-4 would swamp m²);
    m is floored at 2⁻¹⁴ so (√eps / m)² stays finite in float16.
    """
    m = x.abs().amax(-1, keepdim=True).clamp(min=2.0**-14)
    xs = x / m
    rel_eps = torch.full_like(m, math.sqrt(eps)) / m
    return xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + rel_eps * rel_eps) * weight


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    try:
        return ACT2FN[name]
    except KeyError:
        raise ModelError(f"unknown activation {name!r} in the model config") from None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Rope on x [..., q, hd], or on its first `dim` dims only (partial rotary; None = all)."""
    if dim is None:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def stored_table_sizes(model: nn.Module, family: Family, context: int) -> list[int]:
    """Element counts of the tables the wrapper keeps for a `context` (each a float16 constant of
    the package): a cos and a sin table per distinct rope key, and the positions vector when a
    sliding window is shorter than the context (as `StatefulCausalLM.__init__` registers them)."""
    cfg = model.config
    sizes = []
    for width in rope_widths(model, family).values():
        sizes += [context * width, context * width]
    if any(w and w < context for w in family.layer_windows(cfg)):
        sizes.append(context)
    return sizes


def rope_widths(model: nn.Module, family: Family) -> dict[str | None, int]:
    """Rope key → the width of its tables: head_dim, or less under partial rotary (Phi-4-mini)."""
    rotary = get_module(model, family.rotary)
    head_dim = _head_dim(model, family)
    return {key: _rope_tables(rotary, 2, head_dim, key)[0].shape[-1] for key in dict.fromkeys(family.rope_keys(model.config))}


def has_partial_rotary(model: nn.Module, family: Family) -> bool:
    """Whether some rope covers only part of each head (the wrapper's `rotary_dim`: a slice and a concat)."""
    return any(width < _head_dim(model, family) for width in rope_widths(model, family).values())


def _head_dim(model: nn.Module, family: Family) -> int:
    return get_module(model, family.blocks)[0].self_attn.head_dim


def _rope_name(kind: str, key: str | None) -> str:
    return f"rope_{kind}" if key is None else f"rope_{kind}_{key}"


@torch.no_grad()
def _rope_tables(rotary_emb: nn.Module, context: int, head_dim: int, key: str | None = None):
    """cos, sin: [context, rotary_dim] float32 from the model's own rotary module (any rope scaling;
    `key` = the layer type for per-layer-type rope).

    A table slice keeps the angles exact in a float16 program (an in-graph position × frequency
    product loses whole radians at long positions in float16). Rope types that depend on the
    sequence length (Phi-3 longrope) see `context` positions, i.e. the factors HF uses for a
    sequence of that length.
    """
    positions = torch.arange(context)[None]  # (1, context)
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary_emb(probe, positions) if key is None else rotary_emb(probe, positions, key)
    if cos.shape[-1] > head_dim or cos.shape[-1] % 2:
        raise ModelError(f"rotary tables have {cos.shape[-1]} dims but heads have {head_dim}")
    return cos[0].float(), sin[0].float()
