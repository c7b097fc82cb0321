"""Measure every candidate of every layer: its output error on the calibration data and its bytes.

The engine's own streaming pass (capture, per-block Hessians, lazy blocks, every family's
arguments) with one difference: each layer's solve step solves every candidate of its menu
(through the solvers' public API), records them, and leaves the weight as it was — so every
Hessian is that of the *uncompressed* model. Layers sharing an input (q/k/v, gate/up) solve each
common candidate as one stacked matrix where the method has a group solver (the same answers as
one by one, one Hessian factorization instead of one per layer).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..coreml.layout import exported_bytes
from ..engine import LayerwiseCompressor
from ..formats import CompressedWeight
from ..hessian import relative_error
from ..linears import weight_out_in
from ..recipe import Recipe, Rule
from ..solvers import GROUP_SOLVERS, METHODS, MethodConfig

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One config solved for one layer."""

    config: MethodConfig
    error: float  # tr(ΔW H ΔWᵀ), H = 2/N Σ xᵀx over the calibration inputs of the layer
    row_errors: torch.Tensor  # [out] float64: (ΔW H ΔWᵀ)_jj, each output channel's share of `error`
    rel_error: float  # error / tr(W H Wᵀ)
    checkpoint_bytes: int  # every stored byte in the layerwise checkpoint
    export_bytes: int  # weight-file bytes in the exported mlpackage


def measure_candidates(
    model: nn.Module, menus: dict[str, tuple[MethodConfig, ...]], windows: torch.Tensor,
    device: str = "auto", batch_size: int = 8, offload_dir=None,
) -> dict[str, list[Candidate]]:
    """{layer name: one Candidate per config of its menu}. windows: [N, L] token ids.
    offload_dir: keep the block activations memory-mapped there (the engine's --offload-activations)."""
    measurer = _CandidateMeasurer(model, menus, device=device, batch_size=batch_size, offload_dir=offload_dir)
    measurer.compress(windows)
    return {name: measurer.table[name] for name in menus}


class _CandidateMeasurer(LayerwiseCompressor):
    """The engine's loop; its per-layer solve measures the whole menu and changes nothing."""

    def __init__(self, model, menus, **kwargs):
        # the plan (which layers, checked shapes) comes from each menu's first candidate; not staged:
        # the model stays uncompressed, so one Hessian pass per block gives the same Hessians
        recipe = Recipe(tuple(Rule(f"^{re.escape(name)}$", menu[0]) for name, menu in menus.items()))
        super().__init__(model, recipe, staged=False, **kwargs)
        self.menus = menus
        self.table: dict[str, list[Candidate]] = {}

    @property
    def needs_data(self) -> bool:  # every candidate is weighed on the calibration inputs
        return True

    def _solve_linears(self, linears, hessian, reports) -> dict[str, CompressedWeight]:
        """Every solve of the engine (one layer or a group sharing `hessian`) goes through here."""
        weights = {name: weight_out_in(linear) for name, linear in linears.items()}
        solved: dict[str, list[CompressedWeight | None]] = {name: [None] * len(self.menus[name]) for name in linears}
        for name in linears:
            for k, config in enumerate(self.menus[name]):
                if solved[name][k] is not None:
                    continue
                # every layer of the group whose menu has this config (configs are unhashable dataclasses)
                members = [(n, self.menus[n].index(config)) for n in linears if config in self.menus[n]]
                for (n, j), cw in zip(members, _solve(config, [weights[n] for n, _ in members], hessian)):
                    solved[n][j] = cw
        for name in linears:
            self.table[name] = [_candidate(weights[name], cw, hessian, c) for cw, c in zip(solved[name], self.menus[name])]
        # what the engine keeps for each layer (no writer): nothing worth the memory
        return {name: _PLACEHOLDER for name in linears}


_PLACEHOLDER = CompressedWeight((1, 1), "dense", values=torch.zeros(1, 1, dtype=torch.float16))


def _solve(config: MethodConfig, weights: list[torch.Tensor], hessian: torch.Tensor) -> list[CompressedWeight]:
    """One candidate for layers sharing `hessian`: stacked when the method has a group solver."""
    h = hessian if config.needs_hessian else None
    if len(weights) > 1 and config.method in GROUP_SOLVERS:
        return [s.compressed for s in GROUP_SOLVERS[config.method](weights, h, config)]
    return [METHODS[config.method][1](w, h, config).compressed for w in weights]


def _candidate(weight: torch.Tensor, cw: CompressedWeight, hessian: torch.Tensor, config: MethodConfig) -> Candidate:
    dense = cw.dequantize().to(device=weight.device, dtype=torch.float32)
    delta = dense - weight.to(torch.float32)
    rows = ((delta @ hessian) * delta).sum(dim=1).double().cpu()
    return Candidate(
        config=config,
        error=float(rows.sum()),
        row_errors=rows,
        rel_error=relative_error(weight, dense, hessian),
        checkpoint_bytes=cw.payload_bytes(),
        export_bytes=exported_bytes(cw),
    )
