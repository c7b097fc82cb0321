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

from ..errors import RecipeError
from ..exporters import DEFAULT_FORMAT, get_exporter
from ..recipe import Recipe, Rule
from .knapsack import choose
from .loss_scale import output_fisher_scales
from .measure import Candidate, measure_candidates
from .menu import layer_menus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Exactly one of: bits per weight over the budgeted layers (every stored byte of the
    checkpoint), or the size in MB (10⁶ bytes) of the export in `format` (its exporter prices it)."""

    bits: float | None = None
    mb: float | None = None
    format: str = DEFAULT_FORMAT

    def __post_init__(self):
        if (self.bits is None) == (self.mb is None):
            raise RecipeError("give exactly one of --target-bits and --target-mb")
        value = self.bits if self.bits is not None else self.mb
        if not isinstance(value, (int, float)) or value <= 0:
            raise RecipeError(f"the target {value!r} must be a positive number")
        get_exporter(self.format)

    def describe(self) -> str:
        if self.bits is not None:
            return f"{self.bits:g} bits/weight"
        return f"{self.mb:g} MB {get_exporter(self.format).suffix.lstrip('.') or self.format}"


@dataclass
class Allocation:
    recipe: Recipe  # one rule per budgeted layer, its chosen config
    target: Target
    budget_bytes: int  # what the chosen candidates' bytes had to fit in
    used_bytes: int  # what they take (checkpoint bytes for bits, weight-file bytes for MB)
    bits_per_weight: float  # checkpoint bits per weight over the budgeted layers
    export_mb: float  # predicted size of the export in the target's format
    predicted_dloss: float  # Σ_j s_j · row error_j over the chosen candidates (mean next-token loss)
    table: dict[str, list[Candidate]] = field(repr=False)
    scales: dict[str, torch.Tensor] = field(repr=False)  # [out] per layer, see loss_scale.py
    chosen: dict[str, int] = field(repr=False)

    def summary(self) -> dict:
        """JSON-able record for the checkpoint manifest."""
        return {
            "target": {"bits": self.target.bits, "mb": self.target.mb,
                       **({"format": self.target.format} if self.target.mb is not None else {})},
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
    fixed = get_exporter(target.format).fixed_bytes(model, names)
    if target.bits is not None:
        budget = int(target.bits * numel / 8)
        costs = [[c.checkpoint_bytes for c in table[n]] for n in names]
    else:
        budget = int(target.mb * 1e6) - fixed
        costs = [[c.export_bytes[target.format] for c in table[n]] for n in names]
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
        export_mb=(fixed + sum(table[n][k].export_bytes[target.format] for n, k in chosen.items())) / 1e6,
        predicted_dloss=sum(losses[i][k] for i, k in enumerate(picks)),
        table=table, scales=scales, chosen=chosen,
    )
    log.info("budget %s: %.4f bits/weight, %.2f MB exported (predicted), predicted Δloss %.4g",
             target.describe(), allocation.bits_per_weight, allocation.export_mb, allocation.predicted_dloss)
    return allocation


def _numel(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.numel()


def _describe(target: Target, nbytes: int, numel: int, fixed: int) -> str:
    if target.bits is not None:
        return f"{8 * nbytes / numel:.3f} bits/weight"
    return f"{(nbytes + fixed) / 1e6:.2f} MB"
