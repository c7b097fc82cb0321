"""Which block weights layerwise compresses, and how each is seen as a linear's [out, in] matrix.

Two module kinds hold one: `nn.Linear` (weight [out, in]) and transformers' `Conv1D` (GPT-2 and
its kin: weight [in, out], the transpose). Solvers, checkpoints and reports always work on the
[out, in] view; only reading and writing a module's weight knows the difference.

Fused 3-D expert tensors (Qwen3-MoE, Mixtral in transformers 5: `experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]) are refused: compressing them needs each expert's own Hessian over
the tokens routed to it, which the engine does not collect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .compressible import is_compressible, is_transposed
from .errors import ModelError
from .formats import CompressedWeight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a compressible module."""
    rows, cols = module.weight.shape
    return (cols, rows) if is_transposed(module) else (rows, cols)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a view for Conv1D)."""
    w = module.weight.data
    return w.t() if is_transposed(module) else w


def set_weight_out_in(module: nn.Module, dense: torch.Tensor) -> None:
    """Store an [out, in] matrix as the module's weight, in the module's own layout."""
    module.weight.data = dense.t().contiguous() if is_transposed(module) else dense


def put_dense(linear: nn.Module, cw: CompressedWeight) -> None:
    """The compressed weight's dense values into `linear` (later stages and blocks see them), in the
    dtype it stores its weight in (float16 values: exact in float16 and float32)."""
    weight = linear.weight
    set_weight_out_in(linear, cw.dequantize().to(device=weight.device, dtype=weight.dtype))


def to_module_layout(module: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """An [out, in] matrix laid out as `module` stores its weight (checkpoint loading)."""
    return dense.t().contiguous() if is_transposed(module) else dense


@dataclass(frozen=True)
class LeftOut:
    """A block weight (a matrix or bigger) the checkpoint keeps in float16, and why."""

    name: str  # full parameter name
    kind: str  # the same with the block index as `*`: model.layers.*.mlp.gate.weight
    numel: int
    reason: str  # "recipe: none", "not a linear layer (…)"


def refuse_expert_tensors(block: nn.Module, block_name: str) -> None:
    """ModelError naming a block's 3-D parameters (fused MoE experts), which cannot be compressed."""
    found = [(f"{block_name}.{n}", tuple(p.shape)) for n, p in block.named_parameters() if p.dim() >= 3]
    if found:
        listed = ", ".join(f"{n} {list(s)}" for n, s in found[:2])
        raise ModelError(
            f"mixture-of-experts weights are unsupported: {listed} are fused 3-D expert tensors [experts, out, in], "
            "and layerwise compresses only nn.Linear / Conv1D weights (each expert would need the Hessian of the "
            f"tokens routed to it); use a dense decoder (declared families: {_family_names()}, or any decoder whose "
            "blocks hold nn.Linear / Conv1D layers)"
        )


def _family_names() -> str:
    from layerwise.models.families import FAMILIES

    return ", ".join(f.name for f in FAMILIES)


def left_out_weights(blocks: nn.ModuleList, blocks_path: str, planned: set[str]) -> list[LeftOut]:
    """Every block weight (parameter of 2 or more dims) whose layer is not in `planned` (full layer
    names), with the reason it stays float16."""
    out = []
    for index, block in enumerate(blocks):
        for rel, module in block.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() < 2:
                    continue  # norms and biases are not block weights to compress
                layer = ".".join(filter(None, (blocks_path, str(index), rel)))
                if is_compressible(module) and pname == "weight":
                    if layer in planned:
                        continue
                    reason = "recipe: none"
                else:
                    reason = f"not a linear layer ({type(module).__name__})"
                kind = ".".join(filter(None, (blocks_path, "*", rel, pname)))
                out.append(LeftOut(f"{layer}.{pname}", kind, p.numel(), reason))
    return out


def left_out_summary(left_out: list[LeftOut], blocks: nn.ModuleList) -> dict:
    """The manifest's account of block weights kept in float16, grouped by reason."""
    weights = [p for p in blocks.parameters() if p.dim() >= 2]
    reasons: dict[str, dict] = {}
    for w in left_out:
        entry = reasons.setdefault(w.reason, {"weights": 0, "parameters": 0, "kinds": []})
        entry["weights"] += 1
        entry["parameters"] += w.numel
        if w.kind not in entry["kinds"]:
            entry["kinds"].append(w.kind)
    return {
        "weights": len(left_out),
        "parameters": sum(w.numel for w in left_out),
        "block_weights": len(weights),
        "block_parameters": sum(p.numel() for p in weights),
        "reasons": reasons,
    }


def describe_left_out(summary: dict) -> str:
    """One clause for the compress summary line, from `left_out_summary`'s dict."""
    if not summary.get("weights"):
        return "no block weight left float16"
    share = summary["parameters"] / max(summary["block_parameters"], 1)
    why = "; ".join(f"{', '.join(r['kinds'][:3])}{' …' if len(r['kinds']) > 3 else ''} ({reason})"
                    for reason, r in summary["reasons"].items())
    return (f"{summary['weights']} of {summary['block_weights']} block weights ({share:.1%} of their parameters) "
            f"left float16: {why}")
