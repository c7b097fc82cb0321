"""SparseGPT (Frantar & Alistarh, 2023): prune (and optionally quantize) column by column,
compensating each column's error on the columns not yet visited through the inverse Hessian.

The mask is chosen by OBS saliency w² / [U]_jj², U the upper Cholesky factor of H⁻¹ (as in the
reference), always on the current, error-updated weights: unstructured, at the start of every
column block the lowest-saliency entries of the whole [out, column_block] block go; n:m, when the
sweep reaches each group of m columns, the m − n lowest of that group in each row go (choosing all
of a block's n:m masks up front, from weights not yet updated by the block's own columns, is
measurably worse).
Unstructured counts are exact: block b gets round(s·out·end_b) − round(s·out·start_b) zeros, so
the layer ends with exactly round(s·numel) zeros (see `prune_counts`).

Joint (bits set): a quant block's grid is fitted when the sweep reaches it, on its current
(error-updated) kept weights; columns whose mask is not chosen yet (a quant block wider than
`column_block`, e.g. per-channel) count as kept.

Float kept weights (no bits) are then re-solved for the final mask (`refine.py`, `refine_steps`).
"""

from __future__ import annotations

import logging
import math

import torch

from ..hessian import dead_columns, output_error, prepare_hessian
from .base import Solution, stack_rows
from .grid import dequantize, fit_grid, quantize
from .magnitude import keep_lowest, nm_keep, prune_counts, sparse_weight
from .refine import refine_masked
from .sparse_config import SparseGPTConfig
from .sweep import obs_sweep

log = logging.getLogger(__name__)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, config: SparseGPTConfig) -> Solution:
    """weight: [out, in]; hessian: [in, in] float32 → sparse dense or sparse affine CompressedWeight."""
    return sparsegpt_group([weight], hessian, config)[0]


def sparsegpt_group(weights: list[torch.Tensor], hessian: torch.Tensor, config: SparseGPTConfig) -> list[Solution]:
    """Layers sharing one input solved as one stacked sweep. Unstructured masks are chosen per layer
    (each layer's rows of a column block), so every layer keeps its exact zero count; n:m masks,
    grids and the refinement are per row anyway."""
    W, rows = stack_rows(weights)
    W[:, dead_columns(hessian)] = 0
    target = W.clone() if config.refine_steps else None
    prepared = prepare_hessian(hessian, config.damp, keep_damped=config.refine_steps > 0)
    U = prepared.cholesky_of_inverse.to(W.device)
    rule = _PruneRule(W, rows, torch.diag(U), config)
    obs_sweep(W, U, rule, config.column_block)
    rule.finish()

    solutions = []
    for r in rows:
        notes = list(prepared.notes)
        mask = rule.mask[r]
        if rule.joint:
            compressed = sparse_weight(mask, config, codes=rule.codes[r], scale=rule.scale[r], zero=rule.zero[r])
        else:
            values = rule.values[r]
            if config.refine_steps and not mask.all():  # nothing pruned: the sweep's float16 compensation is better
                values = _refined(target[r], values, mask, prepared, config.refine_steps, notes=notes)
            compressed = sparse_weight(mask, config, values=values)
        solutions.append(Solution(compressed, damping=prepared.damping, notes=notes))
    return solutions


class _PruneRule:
    """SparseGPT's column rule: the mask by OBS saliency w² / U_jj² on the current weights (per
    column block, or per group of m columns for n:m), then float16 or the block's grid, zero where
    pruned."""

    def __init__(self, W, rows, diag_u, config):
        out_f, in_f = W.shape
        dev = W.device
        self.config, self.rows, self.diag_u = config, rows, diag_u
        if config.sparsity is not None:
            starts = range(0, in_f, config.column_block)
            # per layer: zeros of each column block, so each layer ends with exactly round(s·numel)
            self.zeros = [
                prune_counts(config.sparsity, [min(config.column_block, in_f - i1) * (r.stop - r.start) for i1 in starts])
                for r in rows
            ]
        # stored one contiguous row per column (block) for the per-column steps, [out, …] after `finish`
        self.mask_t = torch.ones(in_f, out_f, dtype=torch.bool, device=dev)  # True = kept (or not chosen yet)
        self.joint = config.bits is not None
        if self.joint:
            self.maxq = 2**config.bits - 1
            self.block = config.block_size or in_f
            self.scale_t = torch.ones(in_f // self.block, out_f, dtype=torch.float16, device=dev)
            self.zero_t = torch.zeros(in_f // self.block, out_f, dtype=torch.uint8, device=dev)
            self.codes_t = torch.zeros(in_f, out_f, dtype=torch.uint8, device=dev)
        else:
            self.values_t = torch.zeros(in_f, out_f, dtype=torch.float16, device=dev)

    def finish(self):
        """The results as [out, …]: mask, and codes / scale / zero (joint) or values."""
        names = ("mask", "codes", "scale", "zero") if self.joint else ("mask", "values")
        for name in names:
            setattr(self, name, getattr(self, name + "_t").t().contiguous())

    def start_batch(self, i1, batch, diag_u):
        if self.config.nm is not None:
            return
        i2 = i1 + batch.shape[1]
        saliency = batch**2 / diag_u[None, :] ** 2  # [out, cb]
        b = i1 // self.config.column_block
        for r, zeros in zip(self.rows, self.zeros):
            self.mask_t[i1:i2, r] = keep_lowest(saliency[r].reshape(1, -1), zeros[b]).reshape(saliency[r].shape).t()

    def start_column(self, col, upcoming):
        c = self.config
        if c.nm is not None and col % c.nm[1] == 0:
            m = c.nm[1]
            self.mask_t[col : col + m] = nm_keep(upcoming(m) ** 2 / self.diag_u[col : col + m][None, :] ** 2, *c.nm).t()
        if self.joint and col % self.block == 0:
            g = col // self.block
            self.scale_t[g], self.zero_t[g] = fit_grid(
                upcoming(self.block), c.bits, c.sym, c.mse_clip, mask=self.mask_t[col : col + self.block].t()
            )

    def round(self, col, w):
        if self.joint:
            g = col // self.block
            codes = quantize(w, self.scale_t[g], self.zero_t[g], self.maxq)
            self.codes_t[col] = codes
            q = dequantize(codes, self.scale_t[g], self.zero_t[g]).float()
        else:
            half = w.to(torch.float16)
            self.values_t[col] = half
            q = half.float()
        return torch.where(self.mask_t[col], q, 0.0)


def _refined(target, values, mask, prepared, steps, notes) -> torch.Tensor:
    """The refined float16 values, or `values` unchanged (with a note) if float32 round-off made
    the refinement worse on the Hessian it minimises (an ill-conditioned layer)."""
    H = prepared.damped.to(values.device)
    values = torch.where(mask, values, 0.0)  # the sweep stored every column's value before its pruning
    refined = refine_masked(target, values.float(), mask, H, steps).to(torch.float16)
    before, after = output_error(target, values, H), output_error(target, refined, H)
    if math.isfinite(after) and after <= before:
        return refined
    note = f"refinement raised the layer error ({before:.3g} -> {after:.3g}); kept SparseGPT's weights"
    log.warning(note)
    notes.append(note)
    return values
