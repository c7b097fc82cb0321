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

from ..hessian import output_error, prepare_hessian
from .base import Solution, to_float32, upcoming_columns
from .grid import dequantize, fit_grid, quantize
from .magnitude import keep_lowest, nm_keep, prune_counts, sparse_weight
from .refine import refine_masked
from .sparse_config import SparseGPTConfig

log = logging.getLogger(__name__)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, config: SparseGPTConfig) -> Solution:
    """weight: [out, in]; hessian: [in, in] float32 → sparse dense or sparse affine CompressedWeight."""
    W = to_float32(weight)
    out_f, in_f = W.shape
    dev = W.device
    dead = torch.diag(hessian) == 0
    W[:, dead] = 0
    target = W.clone() if config.refine_steps else None
    prepared = prepare_hessian(hessian, config.damp, keep_damped=config.refine_steps > 0)
    Hinv = prepared.inverse_cholesky.to(dev)  # [in, in] upper, H⁻¹ = Uᵀ U
    diag_hinv = torch.diag(Hinv)

    starts = list(range(0, in_f, config.column_block))
    if config.sparsity is not None:
        sizes = [min(config.column_block, in_f - i1) * out_f for i1 in starts]
        zeros_per_block = prune_counts(config.sparsity, sizes)
    mask = torch.ones(out_f, in_f, dtype=torch.bool, device=dev)  # True = kept (or not chosen yet)
    joint = config.bits is not None
    if joint:
        maxq = 2**config.bits - 1
        block = config.block_size or in_f
        scale = torch.ones(out_f, in_f // block, dtype=torch.float16, device=dev)
        zero = torch.zeros(out_f, in_f // block, dtype=torch.uint8, device=dev)
        codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=dev)
    else:
        values = torch.zeros(out_f, in_f, dtype=torch.float16, device=dev)

    for b, i1 in enumerate(starts):
        i2 = min(i1 + config.column_block, in_f)
        W1 = W[:, i1:i2].clone()  # [out, cb]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if config.nm is None:
            saliency = W1**2 / torch.diag(Hinv1)[None, :] ** 2  # [out, cb]
            mask[:, i1:i2] = keep_lowest(saliency.reshape(1, -1), zeros_per_block[b]).reshape(W1.shape)

        for i in range(i2 - i1):
            col = i1 + i
            if config.nm is not None and col % config.nm[1] == 0:
                m = config.nm[1]
                current = upcoming_columns(W1, W[:, i2:], i, m)  # the group's updated weights
                mask[:, col : col + m] = nm_keep(current**2 / diag_hinv[col : col + m][None, :] ** 2, *config.nm)
            w, keep = W1[:, i], mask[:, col]
            if joint:
                g = col // block
                if col % block == 0:
                    current = upcoming_columns(W1, W[:, i2:], i, block)
                    scale[:, g], zero[:, g] = fit_grid(
                        current, config.bits, config.sym, config.mse_clip, mask=mask[:, col : col + block]
                    )
                c = quantize(w, scale[:, g], zero[:, g], maxq)
                codes[:, col] = c
                q = dequantize(c, scale[:, g], zero[:, g]).float()
            else:
                q = w.to(torch.float16).float()
                values[:, col] = q.to(torch.float16)
            q = torch.where(keep, q, torch.zeros_like(q))
            err = (w - q) / Hinv1[i, i]  # [out]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if joint:
        compressed = sparse_weight(mask, config, codes=codes, scale=scale, zero=zero)
    else:
        if config.refine_steps and not mask.all():  # nothing pruned: the sweep's float16 compensation is better
            values = _refined(target, values, mask, prepared, config.refine_steps, notes=prepared.notes)
        compressed = sparse_weight(mask, config, values=values)
    return Solution(compressed, damping=prepared.damping, notes=prepared.notes)


def _refined(target, values, mask, prepared, steps, notes) -> torch.Tensor:
    """The refined float16 values, or `values` unchanged (with a note) if float32 round-off made
    the refinement worse on the Hessian it minimises (an ill-conditioned layer)."""
    H = prepared.damped.to(values.device)
    refined = refine_masked(target, values.float(), mask, H, steps).to(torch.float16)
    before, after = output_error(target, values, H), output_error(target, refined, H)
    if math.isfinite(after) and after <= before:
        return refined
    note = f"refinement raised the layer error ({before:.3g} -> {after:.3g}); kept SparseGPT's weights"
    log.warning(note)
    notes.append(note)
    return values
