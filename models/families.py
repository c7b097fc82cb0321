"""Declarative per-family layouts and traits: what differs between decoder architectures, as data.

One typed `Family` entry per architecture says where the blocks are, which linears share an input
(the engine's staged Hessians), and every trait the export wrapper, the capture step and `generate`
must reproduce (norm kind, block layout, q/k norms, multipliers, soft-caps, sliding windows,
per-layer rope, fused projections, activation). Numeric values are read from the HF config at run
time; an entry only names WHICH config fields apply. Nothing outside this module tests
`config.model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch.nn as nn

from layerwise.errors import ModelError
from layerwise.compressible import is_compressible

LinearGroup = tuple[str, ...]  # linear names (relative to a block) fed the same input tensor

SLIDING = "sliding_attention"  # HF's layer_types values
FULL = "full_attention"


class NormKind(str, Enum):
    RMS = "rms"  # x / rms(x) * w
    RMS_ONE_PLUS = "rms_one_plus"  # Gemma: x / rms(x) * (1 + w), weights stored as offsets from 1
    LAYER = "layer"  # LayerNorm with bias


class QKNorm(str, Enum):
    NONE = "none"
    PER_HEAD = "per_head"  # Qwen3, Gemma 3: norm over head_dim after the head split, before rope
    FULL_WIDTH = "full_width"  # OLMo 2: norm over all heads' width on the projection output


class WindowRule(str, Enum):
    NONE = "none"  # every layer attends to the whole past
    EVERY_LAYER = "every_layer"  # config.sliding_window (when set) bounds every layer (Mistral, Phi-3)
    LAYER_TYPES = "layer_types"  # config.layer_types[i] == "sliding_attention" layers use config.sliding_window


@dataclass(frozen=True)
class ConfigScalar:
    """A number read from the HF config: `config.<field> ** power`; None when the field is unset."""

    field: str
    power: float = 1.0

    def value(self, config) -> float | None:
        raw = getattr(config, self.field, None)
        return None if raw is None else float(raw) ** self.power

    def describe(self) -> str:
        return self.field if self.power == 1.0 else f"{self.field}^{self.power:g}"


@dataclass(frozen=True)
class BlockNorms:
    """Norm module names inside a block (None = absent). The block computes
    h += attn_out(attn(attn_in(h))) · r ;  h += mlp_out(mlp(mlp_in(h))) · r   (r: residual multiplier)."""

    attn_in: str | None = "input_layernorm"
    attn_out: str | None = None
    mlp_in: str | None = "post_attention_layernorm"
    mlp_out: str | None = None

    @property
    def layout(self) -> str:
        if self.attn_in and self.attn_out:
            return "sandwich"
        return "pre-norm" if self.attn_in else "post-norm"


PRE_NORM = BlockNorms()  # Llama: norm before attention and before the MLP
SANDWICH = BlockNorms("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
POST_NORM = BlockNorms(None, "post_attention_layernorm", None, "post_feedforward_layernorm")  # OLMo 2


@dataclass(frozen=True)
class AttentionLinears:
    """Attention projections relative to a block: q, k, v separate, or one fused `qkv` split [q | k | v]."""

    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    qkv: str | None = None  # fused (Phi-3): rows [H·hd | KV·hd | KV·hd]
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"

    def inputs(self) -> LinearGroup:
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)


@dataclass(frozen=True)
class MlpLinears:
    """Gated MLP down(act(gate(x)) · up(x)): gate and up separate, or one fused `gate_up` split [gate | up]."""

    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    down: str = "mlp.down_proj"
    gate_up: str | None = None  # fused (Phi-3): rows [gate | up]

    def inputs(self) -> LinearGroup:
        return (self.gate_up,) if self.gate_up else (self.gate, self.up)


LLAMA_ATTENTION = AttentionLinears()
LLAMA_MLP = MlpLinears()


def linear_groups(attention: AttentionLinears, mlp: MlpLinears) -> tuple[LinearGroup, ...]:
    """Groups of linears sharing an input, in execution order: qkv → o → gate/up → down."""
    return (attention.inputs(), (attention.o,), mlp.inputs(), (mlp.down,))


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # HF `config.model_type` values
    blocks: str  # dotted path of the nn.ModuleList of decoder blocks
    groups: tuple[LinearGroup, ...] | None  # in execution order; None = discover by a forward
    final_norm: str | None = None  # dotted path of the norm before lm_head
    lm_head: str = "lm_head"
    # --- traits (defaults = Llama); read by the export wrapper, capture and generate ---
    embeddings: str = "model.embed_tokens"  # dotted path of the token embedding
    rotary: str = "model.rotary_emb"  # the model's own rotary module (any rope scaling)
    norm: NormKind = NormKind.RMS
    norm_eps: str = "rms_norm_eps"  # config field
    block_norms: BlockNorms = PRE_NORM
    qk_norm: QKNorm = QKNorm.NONE
    attention: AttentionLinears = LLAMA_ATTENTION
    mlp: MlpLinears = LLAMA_MLP
    activation: str = "hidden_act"  # config field naming the MLP activation (ACT2FN key)
    embed_scale: ConfigScalar | None = None  # embeddings × value (Gemma √hidden, Granite embedding_multiplier)
    residual_scale: ConfigScalar | None = None  # each branch × value before the residual add (Granite)
    attention_scale: ConfigScalar | None = None  # q·k scale; None = 1/√head_dim
    logit_scale: ConfigScalar | None = None  # logits × value (Granite: 1 / logits_scaling)
    attn_softcap: str | None = None  # config field: scores = c·tanh(scores / c) (Gemma 2)
    final_softcap: str | None = None  # config field: logits = c·tanh(logits / c) (Gemma 2/3)
    # the float16 export carries the residual stream divided by this power of two (see stateful.py):
    # 1 = as is; above 1 only where the embedding multiplier and the branch post-norms (or the
    # residual multiplier) can absorb it, so it costs no op
    residual_divisor: int = 1
    window: WindowRule = WindowRule.NONE
    rope_per_layer_type: bool = False  # rotary(x, pos, layer_type): local/global rope (Gemma 3)
    exportable: bool = True  # the stateful wrapper reproduces it (generic fallbacks: compress only)
    aliases: tuple[str, ...] = field(default=())  # checkpoints this entry covers, for `layerwise families`

    def __post_init__(self):
        s = self.residual_divisor
        if s < 1 or s & (s - 1):
            raise ValueError(f"{self.name}: residual_divisor={s} must be a power of two (exact in float16)")
        norms = self.block_norms
        foldable = (self.embed_scale is not None and norms.attn_in and norms.mlp_in
                    and ((norms.attn_out and norms.mlp_out) or self.residual_scale is not None))
        if s > 1 and not foldable:
            raise ValueError(f"{self.name}: residual_divisor needs an embedding multiplier, pre-norms and "
                             "post-norms or a residual multiplier to fold into")

    # --- per-layer traits, from the config ---

    def layer_types(self, config) -> tuple[str, ...]:
        """Per layer, "sliding_attention" or "full_attention"."""
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        if self.window is WindowRule.EVERY_LAYER and window:
            return (SLIDING,) * n
        if self.window is WindowRule.LAYER_TYPES and window:
            types = getattr(config, "layer_types", None) or (FULL,) * n
            return tuple(SLIDING if t == SLIDING else FULL for t in types)
        return (FULL,) * n

    def layer_windows(self, config) -> tuple[int | None, ...]:
        """Per layer, the sliding window (a query sees keys at distance < window), or None."""
        window = getattr(config, "sliding_window", None)
        return tuple(window if t == SLIDING else None for t in self.layer_types(config))

    def rope_keys(self, config) -> tuple[str | None, ...]:
        """Per layer, the `layer_type` argument of the rotary module (None: one rope for all layers)."""
        if not self.rope_per_layer_type:
            return (None,) * config.num_hidden_layers
        return tuple(getattr(config, "layer_types"))

    def softcap(self, config) -> tuple[float | None, float | None]:
        """(attention-logit cap, final-logit cap) from the config, None where off."""
        def read(name):
            value = getattr(config, name, None) if name else None
            return float(value) if value else None
        return read(self.attn_softcap), read(self.final_softcap)

    def supports(self) -> tuple[str, ...]:
        return ("compress", "export", "generate") if self.exportable else ("compress",)

    def traits(self, config=None) -> list[str]:
        """Human-readable traits (for `layerwise families` and the package metadata)."""
        out = [f"norm={self.norm.value}", f"layout={self.block_norms.layout}"]
        if self.qk_norm is not QKNorm.NONE:
            out.append(f"qk_norm={self.qk_norm.value}")
        if self.attention.qkv or self.mlp.gate_up:
            out.append("fused=" + ",".join(n.split(".")[-1] for n in (self.attention.qkv, self.mlp.gate_up) if n))
        out.append(f"act={getattr(config, self.activation)}" if config is not None else f"act=config.{self.activation}")
        for label, scalar in (("embed×", self.embed_scale), ("residual×", self.residual_scale),
                              ("attn_scale=", self.attention_scale), ("logits×", self.logit_scale)):
            if scalar is not None:
                out.append(f"{label}{scalar.describe()}")
        for label, cap in (("attn_softcap", self.attn_softcap), ("final_softcap", self.final_softcap)):
            if cap:
                out.append(f"{label}={cap}")
        if self.residual_divisor > 1:
            out.append(f"residual÷{self.residual_divisor}")
        if self.window is not WindowRule.NONE:
            out.append(f"window={self.window.value}")
        if self.rope_per_layer_type:
            out.append("rope=per-layer-type")
        return out


_GEMMA = dict(norm=NormKind.RMS_ONE_PLUS, embed_scale=ConfigScalar("hidden_size", 0.5))
# Gemma 2/3's residual outgrows float16 (Gemma 3 270M: 1.04e5 > 65504): the export carries it ÷16,
# the most that keeps √eps/16 (eps = 1e-6) a normal float16, so the program's numbers are the
# unscaled ones ÷16 exactly; the ceiling becomes 1.05e6
_GEMMA_2_3 = dict(_GEMMA, activation="hidden_activation", block_norms=SANDWICH, attention_scale=ConfigScalar("query_pre_attn_scalar", -0.5),
                  final_softcap="final_logit_softcapping", window=WindowRule.LAYER_TYPES, residual_divisor=16)
_PHI3_ATTENTION = AttentionLinears(None, None, None, qkv="self_attn.qkv_proj")
_PHI3_MLP = MlpLinears(None, None, gate_up="mlp.gate_up_proj")


def _family(name: str, model_types: tuple[str, ...], aliases: tuple[str, ...] = (), **traits) -> Family:
    """A declared family whose blocks sit at model.layers (all ten do), groups derived from its linears."""
    attention, mlp = traits.get("attention", LLAMA_ATTENTION), traits.get("mlp", LLAMA_MLP)
    return Family(name, model_types, "model.layers", linear_groups(attention, mlp), "model.norm",
                  aliases=aliases, **traits)


FAMILIES: tuple[Family, ...] = (
    _family("llama", ("llama",), ("Llama 2", "Llama 3.x", "SmolLM2", "TinyLlama")),
    _family("mistral", ("mistral",), ("Mistral 7B",), window=WindowRule.EVERY_LAYER),
    _family("qwen2", ("qwen2",), ("Qwen2", "Qwen2.5"), window=WindowRule.LAYER_TYPES),
    _family("qwen3", ("qwen3",), ("Qwen3",), qk_norm=QKNorm.PER_HEAD, window=WindowRule.LAYER_TYPES),
    _family("gemma", ("gemma",), ("Gemma",), **_GEMMA),
    _family("gemma2", ("gemma2",), ("Gemma 2",), attn_softcap="attn_logit_softcapping", **_GEMMA_2_3),
    _family("gemma3_text", ("gemma3_text",), ("Gemma 3 (text)",), qk_norm=QKNorm.PER_HEAD,
            attn_softcap="attn_logit_softcapping", rope_per_layer_type=True, **_GEMMA_2_3),
    _family("phi3", ("phi3",), ("Phi-3", "Phi-3.5", "Phi-4-mini"), attention=_PHI3_ATTENTION, mlp=_PHI3_MLP,
            window=WindowRule.EVERY_LAYER),
    _family("granite", ("granite",), ("Granite 3.x",), embed_scale=ConfigScalar("embedding_multiplier"),
            residual_scale=ConfigScalar("residual_multiplier"), attention_scale=ConfigScalar("attention_multiplier"),
            logit_scale=ConfigScalar("logits_scaling", -1.0)),
    _family("olmo2", ("olmo2",), ("OLMo 2",), block_norms=POST_NORM, qk_norm=QKNorm.FULL_WIDTH),
)

# Paths the generic fallback tries before searching the whole model.
_COMMON_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")


def family_names() -> str:
    return ", ".join(f.name for f in FAMILIES)


def resolve_family(model: nn.Module) -> Family:
    """The family entry for `model`, or a generic one (compress only) if its blocks can be found."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            _get(model, family.blocks)  # fail early if the layout moved
            return family
    path = find_block_list(model)
    norm = next((p for p in ("model.norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm")
                 if _has(model, p)), None)
    return Family(f"generic:{model_type}", (model_type,), path, None, norm, exportable=False)


def exportable_family(model: nn.Module, action: str = "export") -> Family:
    """The declared family of `model`, or a ModelError listing the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None or not family.exportable:
        raise ModelError(
            f"cannot {action} {type(model).__name__} (model_type {model_type!r}): supported families are "
            f"{family_names()} (`layerwise families` lists them); other decoders can only be compressed"
        )
    _get(model, family.blocks)
    return family


def find_block_list(model: nn.Module) -> str:
    """Dotted path of the one nn.ModuleList of identical blocks holding linear layers."""
    for path in _COMMON_BLOCK_PATHS:
        if _has(model, path) and _is_block_list(_get(model, path)):
            return path
    candidates = [name for name, m in model.named_modules() if _is_block_list(m)]
    if len(candidates) == 1:
        return candidates[0]
    kind = type(model).__name__
    raise ModelError(
        f"cannot find the decoder blocks of {kind}: looked for one nn.ModuleList of identical blocks "
        f"containing nn.Linear layers (tried {', '.join(_COMMON_BLOCK_PATHS)}), found "
        f"{len(candidates)} candidates {candidates[:4]}; supported families: "
        f"{family_names()} or any decoder with its blocks in one nn.ModuleList"
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    return _get(root, path)


def _is_block_list(m: nn.Module) -> bool:
    if not isinstance(m, nn.ModuleList) or len(m) == 0:
        return False
    kinds = {type(b) for b in m}
    return len(kinds) == 1 and any(is_compressible(x) for x in m[0].modules())  # nn.Linear or GPT-2's Conv1D


def _has(root: nn.Module, path: str) -> bool:
    try:
        _get(root, path)
        return True
    except AttributeError:
        return False


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root
