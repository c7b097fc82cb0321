"""Measure every candidate of every layer: its output error on the calibration data and its bytes.

The engine's block walker (capture, per-block Hessians, lazy blocks, every family's arguments)
with its own group solver, `CandidateMeasurer`: each layer solves every candidate of its menu
(through the method registry), records them, and leaves the weight as it was — so every Hessian
is that of the *uncompressed* model. Layers sharing an input (q/k/v, gate/up) solve each
common candidate as one stacked matrix where the method's solver stacks, and the candidates
of one damping and act-order share one factored H⁻¹ (the same answers as one by one, one
Hessian factorization per group instead of one per layer and candidate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import methods
from ..engine import BlockWalker
from ..exporters import EXPORTERS
from ..formats import CompressedWeight
from ..linears import weight_out_in
from ..plan import left_out, plan_layers
from ..solvers import MethodConfig
from ..solvers.base import prepare_for

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One config solved for one layer."""

    config: MethodConfig
    error: float  # tr(ΔW H ΔWᵀ), H = 2/N Σ xᵀx over the calibration inputs of the layer
    row_errors: torch.Tensor  # [out] float64: (ΔW H ΔWᵀ)_jj, each output channel's share of `error`
    rel_error: float  # error / tr(W H Wᵀ), over every row (the engine's report samples 512)
    checkpoint_bytes: int  # every stored byte in the layerwise checkpoint
    export_bytes: dict[str, int]  # output format → the layer's bytes in it (`Exporter.layer_bytes`)


def measure_candidates(
    model: nn.Module, menus: dict[str, tuple[MethodConfig, ...]], windows: torch.Tensor,
    device: str = "auto", batch_size: int = 8, offload_dir=None,
) -> dict[str, list[Candidate]]:
    """{layer name: one Candidate per config of its menu}. windows: [N, L] token ids.
    offload_dir: keep the block activations memory-mapped there (the engine's --offload-activations)."""
    # not staged: the model stays uncompressed, so one Hessian pass per block gives the same Hessians
    walker = BlockWalker(model, device=device, batch_size=batch_size, staged=False, offload_dir=offload_dir)
    # the layers' checks (shapes, sensitivities, what stays float16) as a compression run makes them
    table = walker.family.embeddings
    plan = plan_layers(model, walker.family, lambda name: menus[name][0] if name in menus else None,
                       embedding=menus[table][0] if table in menus else None)
    left_out(model, walker.family, plan)
    measurer = CandidateMeasurer(menus)
    walker.walk(measurer, windows)
    return {name: measurer.table[name] for name in menus}


class CandidateMeasurer:
    """The walker's group solver of a measuring run (`engine.GroupSolver`): every candidate of every
    layer of a group is solved and recorded in `table`, and the weights stay as they were."""

    needs_data = True  # every candidate is weighed on the calibration inputs

    def __init__(self, menus: dict[str, tuple[MethodConfig, ...]]):
        self.menus = menus
        self.table: dict[str, list[Candidate]] = {}

    @property
    def layers(self) -> dict[str, tuple[MethodConfig, ...]]:
        return self.menus

    def solve_group(self, linears: dict[str, nn.Module], hessian: torch.Tensor | None) -> dict[str, CompressedWeight]:
        """Measure the menus of layers sharing `hessian` ([in, in]; None: the token embedding, data-free
        candidates in weight space); nothing to hand to a sink."""
        weights = {name: weight_out_in(linear) for name, linear in linears.items()}
        solved = solve_menus(weights, hessian, {name: self.menus[name] for name in linears})
        for name in linears:
            reference = float(_row_errors(weights[name].to(torch.float32), hessian).sum())  # tr(W H Wᵀ), once per layer
            self.table[name] = [_candidate(weights[name], cw, hessian, c, reference)
                                for cw, c in zip(solved[name], self.menus[name])]
        return {}

    def reports_of(self, names) -> dict[str, dict]:
        return {}


def solve_menus(weights: dict[str, torch.Tensor], hessian: torch.Tensor,
                menus: dict[str, tuple[MethodConfig, ...]]) -> dict[str, list[CompressedWeight]]:
    """Every candidate of layers sharing `hessian` (weights: {name: [out, in]}), the same answers
    as solving each alone: a config in several menus is solved once for all of them (one stacked
    matrix where the method's solver stacks), and candidates of equal damping and act-order share one
    factored H⁻¹ (`prepare_for`), computed once and dropped before the next one is made."""
    solved: dict[str, list[CompressedWeight | None]] = {name: [None] * len(menu) for name, menu in menus.items()}
    configs = [c for menu in menus.values() for c in menu]
    for key in dict.fromkeys(map(_preparation, configs)):  # distinct, in menu order; one H⁻¹ alive at a time
        prepared = None if key is None else prepare_for(hessian, next(c for c in configs if _preparation(c) == key))
        for name, menu in menus.items():
            for k, config in enumerate(menu):
                if solved[name][k] is not None or _preparation(config) != key:
                    continue
                # every layer whose menu has this config (configs are unhashable dataclasses)
                members = [(n, m.index(config)) for n, m in menus.items() if config in m]
                solutions = methods.solve_group(config, [weights[n] for n, _ in members], hessian, prepared=prepared)
                for (n, j), solution in zip(members, solutions):
                    solved[n][j] = solution.compressed
        del prepared
    return solved


def _preparation(config: MethodConfig) -> tuple[float, bool] | None:
    """What the factored H⁻¹ of `config`'s solve depends on besides H (None: it takes none)."""
    return config.hessian_preparation() if config.needs_hessian else None


def _candidate(weight: torch.Tensor, cw: CompressedWeight, hessian: torch.Tensor, config: MethodConfig,
               reference: float) -> Candidate:
    """reference: tr(W H Wᵀ) of the layer (shared by its candidates)."""
    dense = cw.dequantize().to(device=weight.device, dtype=torch.float32)
    rows = _row_errors(dense - weight.to(torch.float32), hessian)
    error = float(rows.sum())
    return Candidate(
        config=config,
        error=error,
        row_errors=rows,
        rel_error=error / reference if reference > 0 else error,
        checkpoint_bytes=cw.payload_bytes(),
        export_bytes={name: exporter.layer_bytes(cw) for name, exporter in EXPORTERS.items()},
    )


def _row_errors(delta: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """[out] float64 (Δ H Δᵀ)_jj of delta: [out, in] float32; |Δ_j|² without a Hessian (the token
    embedding, whose loss scales weigh each row by the tokens that read it: `loss_scale`)."""
    if hessian is None:
        return delta.pow(2).sum(dim=1).double().cpu()
    return ((delta @ hessian) * delta).sum(dim=1).double().cpu()
