"""Measure every candidate of every layer: its output error on the calibration data and its bytes.

One streaming pass like the engine's, over the *uncompressed* model: per block, one Hessian per
group of linears sharing an input, every candidate of every layer solved against it (through the
solvers' public API), then the block's original outputs feed the next block. Solving a candidate
is cheap next to a forward pass; the weights themselves are left untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from layerwise.models.families import get_module, resolve_family

from ..capture import capture_block_inputs, run_block
from ..coreml.layout import exported_bytes
from ..engine import _move_outside, _onload, collect_hessians, discover_groups, resolve_device
from ..hessian import relative_error
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


@torch.no_grad()
def measure_candidates(
    model: nn.Module, menus: dict[str, tuple[MethodConfig, ...]], windows: torch.Tensor,
    device: str = "auto", batch_size: int = 8,
) -> dict[str, list[Candidate]]:
    """{layer name: one Candidate per config of its menu}. windows: [N, L] token ids."""
    family = resolve_family(model)
    blocks = get_module(model, family.blocks)
    dev = resolve_device(device)
    model.eval()
    prefix = family.blocks + "."
    stored = _move_outside(model, prefix, dev)
    batches = capture_block_inputs(model, blocks[0], windows, batch_size, dev)
    table: dict[str, list[Candidate]] = {}
    try:
        for index in tqdm(range(len(blocks)), desc="measuring candidates", unit="block", disable=None):
            block = blocks[index]
            keep_dtype = _onload(block, dev)
            groups = family.groups or discover_groups(block, batches[0])
            todo = [g for g in groups if any(f"{prefix}{index}.{rel}" in menus for rel in g)]
            if todo:
                hessians = collect_hessians(block, [g[0] for g in todo], batches, stop_early=family.groups is not None)
                for group in todo:
                    for rel in group:
                        name = f"{prefix}{index}.{rel}"
                        if name in menus:
                            weight = block.get_submodule(rel).weight.data
                            table[name] = [_solve(weight, hessians[group[0]], c) for c in menus[name]]
            for batch in batches:
                batch.hidden = run_block(block, batch)
            block.to(device="cpu", dtype=keep_dtype)
    finally:
        _move_outside(model, prefix, torch.device("cpu"), stored)
    return table


def _solve(weight: torch.Tensor, hessian: torch.Tensor, config: MethodConfig) -> Candidate:
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
