"""GPTQ (Frantar et al., 2022): quantize column by column, compensating each column's error on
the columns not yet quantized through the inverse Hessian, in lazy batches (sweep.py).

Per-block scales are fitted when the sweep reaches a block (from the already-updated weights), or,
with act-order, fixed up front from the unpermuted weight ("static groups"), so every block stays
contiguous in the original input order — the layout Core ML's blockwise ops need. Per-channel
grids (one block) are static too. Static grids are fitted all at once, before the sweep.

Every step is row-wise (grids are per row, the permutation depends on H only), so `gptq_group`
solves layers that share H as one stacked matrix with the same result as one by one.
"""

from __future__ import annotations

import torch

from ..formats import CompressedWeight
from ..hessian import PreparedHessian, dead_columns
from .base import Solution, act_order_perm, prepare_for, stack_rows
from .grid import fit_grid
from .quant_config import GPTQConfig
from .sweep import obs_sweep


def gptq(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig, *,
         prepared: PreparedHessian | None = None) -> Solution:
    """weight: [out, in]; hessian: [in, in] float32 → affine CompressedWeight."""
    return gptq_group([weight], hessian, config, prepared=prepared)[0]


def gptq_group(weights: list[torch.Tensor], hessian: torch.Tensor, config: GPTQConfig, *,
               prepared: PreparedHessian | None = None) -> list[Solution]:
    """Layers sharing one input (weights: [out_k, in], hessian: [in, in]) solved as one stacked sweep.
    prepared: `prepare_for(hessian, config)` when the caller already has it (shared by configs of
    equal damping and act-order, e.g. a size budget's candidates); computed here otherwise."""
    W, rows = stack_rows(weights)
    out_f, in_f = W.shape
    block = config.block_size or in_f
    n_blocks = in_f // block

    W[:, dead_columns(hessian)] = 0
    perm = act_order_perm(hessian, config.act_order)
    if prepared is None:
        prepared = prepare_for(hessian, config)

    rule = _GridRule(out_f, in_f, block, config, W.device, perm)
    if rule.static:  # per-channel always (one block), per-block under act-order
        s, z = fit_grid(W.reshape(out_f * n_blocks, block), config.bits, config.sym, config.mse_clip)
        rule.set_grids(slice(None), s.reshape(out_f, n_blocks), z.reshape(out_f, n_blocks))
    if perm is not None:
        W = W[:, perm]
    obs_sweep(W, prepared.cholesky_of_inverse, rule, config.lazy_batch)

    codes = rule.codes_t.t()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return [
        Solution(
            CompressedWeight(
                shape=(r.stop - r.start, in_f), scheme="affine", bits=config.bits,
                codes=codes[r].contiguous().cpu(), scale=rule.scale[r].cpu(), zero_point=rule.zero[r].cpu(),
            ),
            damping=prepared.damping,
            notes=list(prepared.notes),
        )
        for r in rows
    ]


class _GridRule:
    """GPTQ's column rule: nearest code on the column's block grid; dynamic grids are fitted when
    the sweep reaches their block's first column, on its error-updated values."""

    def __init__(self, out_f, in_f, block, config, device, perm):
        self.config, self.block = config, block
        self.maxq = 2**config.bits - 1
        n_blocks = in_f // block
        self.static = config.act_order or n_blocks == 1
        order = perm.tolist() if perm is not None else range(in_f)
        self.block_of = [c // block for c in order]  # original block of each swept column (a list: no syncs)
        self.scale = torch.ones(out_f, n_blocks, dtype=torch.float16, device=device)
        self.zero = torch.zeros(out_f, n_blocks, dtype=torch.uint8, device=device)
        # what the per-column steps read and write is stored one contiguous row per column (or block):
        # a strided [out] column of an [out, in] matrix costs ten times as much to touch.
        # float32 copies of the grids, so the arithmetic reads them without converting
        self.scale_t = torch.ones(n_blocks, out_f, device=device)
        self.zero_t = torch.zeros(n_blocks, out_f, device=device)
        self.codes_t = torch.zeros(in_f, out_f, dtype=torch.uint8, device=device)  # in sweep order

    def set_grids(self, blocks, scale, zero):
        self.scale[:, blocks], self.zero[:, blocks] = scale, zero
        self.scale_t[blocks], self.zero_t[blocks] = scale.float().t(), zero.float().t()

    def start_batch(self, i1, batch, diag_u):
        pass

    def start_column(self, col, upcoming):
        if not self.static and col % self.block == 0:
            c = self.config
            self.set_grids(col // self.block, *fit_grid(upcoming(self.block), c.bits, c.sym, c.mse_clip))

    def round(self, col, w):
        # the same arithmetic as grid.quantize / grid.dequantize, on float32 copies of the grid
        b = self.block_of[col]
        s, z = self.scale_t[b], self.zero_t[b]
        q = torch.round(w / s).add_(z).clamp_(0, self.maxq)
        self.codes_t[col] = q
        return (q - z).mul_(s).to(torch.float16).float()
