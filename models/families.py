"""Declarative per-family layouts: where the blocks are, which linears share an input."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from layerwise.errors import ModelError
from layerwise.linears import is_compressible

LinearGroup = tuple[str, ...]  # linear names (relative to a block) fed the same input tensor


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # HF `config.model_type` values
    blocks: str  # dotted path of the nn.ModuleList of decoder blocks
    groups: tuple[LinearGroup, ...] | None  # in execution order; None = discover by a forward
    final_norm: str | None = None  # dotted path of the norm before lm_head
    lm_head: str = "lm_head"


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "model.layers", _LLAMA_GROUPS, "model.norm"),
    Family("mistral", ("mistral",), "model.layers", _LLAMA_GROUPS, "model.norm"),
    Family("qwen2", ("qwen2",), "model.layers", _LLAMA_GROUPS, "model.norm"),
)

# Paths the generic fallback tries before searching the whole model.
_COMMON_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")


def resolve_family(model: nn.Module) -> Family:
    """The family entry for `model`, or a generic one if its blocks can be found."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            _get(model, family.blocks)  # fail early if the layout moved
            return family
    path = find_block_list(model)
    norm = next((p for p in ("model.norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm")
                 if _has(model, p)), None)
    return Family(f"generic:{model_type}", (model_type,), path, None, norm)


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
        f"{', '.join(f.name for f in FAMILIES)} or any decoder with its blocks in one nn.ModuleList"
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
