"""Choose one candidate per layer for a size budget: least predicted loss for the bytes.

Target → byte budget → measured table (error and bytes of every candidate, `measure.py`) × loss
scales (`loss_scale.py`) → exact knapsack (`knapsack.py`) → a plain per-layer recipe.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..coreml.layout import BLOB_HEADER_BYTES, blob_bytes
from ..errors import RecipeError
from ..models.families import NormKind, resolve_family
from ..models.stateful import has_partial_rotary, stored_table_sizes
from ..recipe import Recipe, Rule
from .knapsack import choose
from .loss_scale import output_fisher_scales
from .measure import Candidate, measure_candidates
from .menu import layer_menus

log = logging.getLogger(__name__)

EXPORT_CONTEXT = 512  # `layerwise export`'s default --context: the rotary tables it stores
# model.mlmodel (the program) and Manifest.json, per family: (fixed bytes, bytes per decoder block),
# measured on tiny models of 2 and 4 blocks with mixed forms (`benchmarks/program_bytes.py`) and
# rounded up (per block × 1.08, fixed × 1.05) so the package stays below the target: an overestimate
# only leaves the weights a little less room. Unknown families take the largest. Partial rotary
# (Phi-4-mini) adds a slice and a concat per q and k: 4.4 kB per block measured (tiny Phi-3, factor 0.5).
PROGRAM_BYTES = {
    "llama": (15_000, 29_000), "mistral": (18_000, 29_000), "qwen2": (15_000, 30_000),
    "qwen3": (14_000, 36_000), "gemma": (15_000, 30_000), "gemma2": (19_000, 38_000),
    "gemma3_text": (20_000, 43_000), "phi3": (15_000, 29_000), "granite": (16_000, 30_000),
    "olmo2": (15_000, 36_000),
}
PROGRAM_BYTES_UNKNOWN = (20_000, 43_000)
PARTIAL_ROTARY_BYTES_PER_BLOCK = 4_800
DEDUP_FROM = 100  # coremltools' const_deduplication threshold (elements)


@dataclass(frozen=True)
class Target:
    """Exactly one of: bits per weight over the budgeted layers (every stored byte of the
    checkpoint), or the exported mlpackage's size in MB (10⁶ bytes)."""

    bits: float | None = None
    mb: float | None = None

    def __post_init__(self):
        if (self.bits is None) == (self.mb is None):
            raise RecipeError("give exactly one of --target-bits and --target-mb")
        value = self.bits if self.bits is not None else self.mb
        if not isinstance(value, (int, float)) or value <= 0:
            raise RecipeError(f"the target {value!r} must be a positive number")

    def describe(self) -> str:
        return f"{self.bits:g} bits/weight" if self.bits is not None else f"{self.mb:g} MB mlpackage"


@dataclass
class Allocation:
    recipe: Recipe  # one rule per budgeted layer, its chosen config
    target: Target
    budget_bytes: int  # what the chosen candidates' bytes had to fit in
    used_bytes: int  # what they take (checkpoint bytes for bits, weight-file bytes for MB)
    bits_per_weight: float  # checkpoint bits per weight over the budgeted layers
    export_mb: float  # predicted mlpackage size
    predicted_dloss: float  # Σ_j s_j · row error_j over the chosen candidates (mean next-token loss)
    table: dict[str, list[Candidate]] = field(repr=False)
    scales: dict[str, torch.Tensor] = field(repr=False)  # [out] per layer, see loss_scale.py
    chosen: dict[str, int] = field(repr=False)

    def summary(self) -> dict:
        """JSON-able record for the checkpoint manifest."""
        return {
            "target": {"bits": self.target.bits, "mb": self.target.mb},
            "budget_bytes": self.budget_bytes,
            "used_bytes": self.used_bytes,
            "bits_per_weight": self.bits_per_weight,
            "predicted_export_mb": self.export_mb,
            "predicted_dloss": self.predicted_dloss,
            "sensitivity": "Σ_j output Fisher s_j × (ΔW H ΔWᵀ)_jj",
            "layers": {
                name: {"choice": k, "candidates": len(self.table[name]), "error": self.table[name][k].error,
                       "predicted_dloss": float(self.scales[name] @ self.table[name][k].row_errors)}
                for name, k in self.chosen.items()
            },
        }


def allocate(
    model: nn.Module, recipe: Recipe, windows: torch.Tensor, target: Target, device: str = "auto",
    batch_size: int = 8, scale_windows: int = 16, offload_dir=None,
) -> Allocation:
    """Measure, weigh and choose. `recipe` has menus (rules with one config count as a menu of one);
    `windows` [N, L] calibrate both the candidates' errors and (the first `scale_windows`) the scales.
    offload_dir: keep the measuring pass's activations memory-mapped there (the engine's option)."""
    menus = layer_menus(model, recipe)
    table = measure_candidates(model, menus, windows, device=device, batch_size=batch_size, offload_dir=offload_dir)
    scales = output_fisher_scales(model, list(menus), windows[:scale_windows], batch_size=min(batch_size, 4), device=device)
    return allocate_from_table(model, table, scales, target)


def allocate_from_table(model: nn.Module, table: dict[str, list[Candidate]], scales: dict[str, float],
                        target: Target) -> Allocation:
    """The knapsack step alone (benchmarks reuse one measured table for many targets)."""
    names = list(table)
    numel = sum(_numel(model, n) for n in names)
    fixed = fixed_export_bytes(model, names)
    if target.bits is not None:
        budget = int(target.bits * numel / 8)
        costs = [[c.checkpoint_bytes for c in table[n]] for n in names]
    else:
        budget = int(target.mb * 1e6) - fixed
        costs = [[c.export_bytes for c in table[n]] for n in names]
    losses = [[float(scales[n] @ c.row_errors) for c in table[n]] for n in names]
    top = sum(max(c) for c in costs)
    if top < 0.99 * budget:
        raise RecipeError(
            f"the target {target.describe()} is above what the menus can use ({_describe(target, top, numel, fixed)} "
            "with every layer at its largest candidate); lower the target or add larger candidates"
        )
    if budget <= 0 or sum(min(c) for c in costs) > budget:
        low = sum(min(c) for c in costs)
        raise RecipeError(
            f"the target {target.describe()} is below what the menus allow ({_describe(target, low, numel, fixed)} "
            "with every layer at its smallest candidate); raise the target or add smaller candidates"
        )
    picks = choose(costs, losses, budget)
    chosen = dict(zip(names, picks))
    used = sum(costs[i][k] for i, k in enumerate(picks))
    rules = tuple(Rule(f"^{re.escape(n)}$", table[n][k].config) for n, k in chosen.items())
    allocation = Allocation(
        recipe=Recipe(rules), target=target, budget_bytes=budget, used_bytes=used,
        bits_per_weight=8 * sum(table[n][k].checkpoint_bytes for n, k in chosen.items()) / numel,
        export_mb=(fixed + sum(table[n][k].export_bytes for n, k in chosen.items())) / 1e6,
        predicted_dloss=sum(losses[i][k] for i, k in enumerate(picks)),
        table=table, scales=scales, chosen=chosen,
    )
    log.info("budget %s: %.4f bits/weight, %.2f MB exported (predicted), predicted Δloss %.4g",
             target.describe(), allocation.bits_per_weight, allocation.export_mb, allocation.predicted_dloss)
    return allocation


def fixed_export_bytes(model: nn.Module, budgeted: list[str]) -> int:
    """Package bytes that do not depend on the choice: the weight file's other blobs and the program text."""
    return other_blob_bytes(model, budgeted) + program_bytes(model)


def program_bytes(model: nn.Module) -> int:
    """model.mlmodel and Manifest.json of the export, as priced for the model's family."""
    family = resolve_family(model)
    fixed, per_block = PROGRAM_BYTES.get(family.name, PROGRAM_BYTES_UNKNOWN)
    if has_partial_rotary(model, family):
        per_block += PARTIAL_ROTARY_BYTES_PER_BLOCK
    return fixed + per_block * model.config.num_hidden_layers


def other_blob_bytes(model: nn.Module, budgeted: list[str], context: int = EXPORT_CONTEXT) -> int:
    """Weight-file bytes besides the budgeted layers: every other tensor as float16 (tied ones
    once), the zero biases the export gives bias-less linears, the tables the export keeps for a
    `context` (rope per key, window positions), and the file's 64-byte header."""
    family = resolve_family(model)
    skip = {f"{n}.weight" for n in budgeted}
    one_plus = family.norm is NormKind.RMS_ONE_PLUS
    seen, total = set(), 0
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if name in skip or key in seen or not tensor.is_floating_point() or _elided(name, tensor, one_plus):
            continue
        seen.add(key)
        total += blob_bytes(tensor.numel(), 16)
    tables = sum(blob_bytes(n, 16) for n in stored_table_sizes(model, family, context))
    return total + zero_bias_bytes(model) + tables + BLOB_HEADER_BYTES


def zero_bias_bytes(model: nn.Module) -> int:
    """coremltools' torch frontend gives every linear without a bias a float16 zero bias [out];
    its `const_deduplication` pass keeps one copy of equal constants of DEDUP_FROM elements or more."""
    sizes = [m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m.bias is None]
    kept = [n for n in sizes if n < DEDUP_FROM] + sorted({n for n in sizes if n >= DEDUP_FROM})
    return sum(blob_bytes(n, 16) for n in kept)


def _elided(name: str, tensor: torch.Tensor, one_plus: bool) -> bool:
    """A norm weight of all ones: the converter drops the multiplication (and the constant). Gemma's
    norms store offsets from 1 (`one_plus`): the export multiplies by 1 + w, so all zeros is ones."""
    ones = 0 if one_plus and "norm" in name else 1
    return tensor.dim() == 1 and bool((tensor == ones).all())


def _numel(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.numel()


def _describe(target: Target, nbytes: int, numel: int, fixed: int) -> str:
    if target.bits is not None:
        return f"{8 * nbytes / numel:.3f} bits/weight"
    return f"{(nbytes + fixed) / 1e6:.2f} MB"
