"""Measure every candidate of every layer: its output error on the calibration data and its bytes.

The engine's own streaming pass (capture, per-block Hessians, lazy blocks, every family's
arguments) with one difference: each layer's solve step solves every candidate of its menu
(through the solvers' public API), records them, and leaves the weight as it was — so every
Hessian is that of the *uncompressed* model. Solving a candidate is cheap next to a forward pass.
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
from ..solvers import METHODS, MethodConfig

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
    device: str = "auto", batch_size: int = 8,
) -> dict[str, list[Candidate]]:
    """{layer name: one Candidate per config of its menu}. windows: [N, L] token ids."""
    measurer = _CandidateMeasurer(model, menus, device=device, batch_size=batch_size)
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
        for name, linear in linears.items():
            weight = weight_out_in(linear)
            self.table[name] = [_candidate(weight, hessian, config) for config in self.menus[name]]
        # what the engine keeps for each layer (no writer): nothing worth the memory
        return {name: _PLACEHOLDER for name in linears}


_PLACEHOLDER = CompressedWeight((1, 1), "dense", values=torch.zeros(1, 1, dtype=torch.float16))


def _candidate(weight: torch.Tensor, hessian: torch.Tensor, config: MethodConfig) -> Candidate:
    solution = METHODS[config.method][1](weight, hessian if config.needs_hessian else None, config)
    cw = solution.compressed
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
