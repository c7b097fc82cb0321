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
from ..hessian import PreparedHessian, dead_columns, prepare_hessian
from .base import Solution, act_order_perm, row_slices
from .grid import fit_grid
from .quant_config import GPTQConfig
from .sweep import obs_sweep_transposed


def gptq(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig, consume_hessian: bool = False, *,
         prepared: PreparedHessian | None = None) -> Solution:
    """weight: [out, in]; hessian: [in, in] float32 → affine CompressedWeight."""
    return gptq_group([weight], hessian, config, consume_hessian, prepared=prepared)[0]


def gptq_group(weights: list[torch.Tensor], hessian: torch.Tensor, config: GPTQConfig,
               consume_hessian: bool = False, *, prepared: PreparedHessian | None = None) -> list[Solution]:
    """Layers sharing one input (weights: [out_k, in], hessian: [in, in]) solved as one stacked sweep.

    consume_hessian: factor H in the caller's buffer (`prepare_hessian(in_place=True)`), for a
    caller that owns H and needs it no more (each Solution's `row_errors` replace it for the
    report): one [in, in] less while the layer is solved. The caller's tensor is left empty
    (0 elements, its memory freed) once the sweep is done.
    prepared: `base.prepare_for(hessian, config)` when the caller already has it (shared by configs
    of equal damping and act-order, e.g. a size budget's candidates); computed here otherwise."""
    in_f, device = hessian.shape[0], hessian.device
    block = config.block_size or in_f
    dead = dead_columns(hessian)
    perm = act_order_perm(hessian, config.act_order)
    if prepared is None:
        prepared = prepare_hessian(hessian, config.damp, perm=perm, in_place=consume_hessian)
    del hessian  # consumed, or the caller's

    rows = row_slices(weights)
    out_f = rows[-1].stop
    rule = _GridRule(out_f, in_f, block, config, device, perm)
    WT = _transposed_in_sweep_order(weights, rows, dead, perm, rule)
    error_sq = torch.zeros(out_f, dtype=torch.float64, device=WT.device)
    obs_sweep_transposed(WT, prepared.cholesky_of_inverse, rule, config.lazy_batch, error_sq)
    del WT
    damping, notes, added = prepared.damping, prepared.notes, prepared.added
    if consume_hessian:  # U lives in the caller's tensor: empty it, so its memory goes now, not
        prepared.cholesky_of_inverse.set_()  # when the last caller frame lets go of it
    del prepared

    codes = (rule.codes_t if perm is None else rule.codes_t[torch.argsort(perm)]).t().contiguous()
    solutions = []
    for r, weight in zip(rows, weights):
        cw = CompressedWeight(shape=(r.stop - r.start, in_f), scheme="affine", bits=config.bits,
                              codes=codes[r].cpu(), scale=rule.scale[r].cpu(), zero_point=rule.zero[r].cpu())
        row_errors = _undamped_row_errors(error_sq[r], weight, cw, dead, added)
        solutions.append(Solution(cw, damping=damping, notes=list(notes), row_errors=row_errors))
    return solutions


def _transposed_in_sweep_order(weights, rows, dead, perm, rule, rows_at_once=256) -> torch.Tensor:
    """The stacked float32 weights as Wᵀ [in, out], columns in sweep order, dead columns zeroed,
    built a few rows at a time (no [out, in] copy beside it); static grids are fitted on the way
    (row-wise, so the same grids as from the whole matrix)."""
    in_f = weights[0].shape[1]
    out_f = rows[-1].stop
    WT = torch.empty(in_f, out_f, device=rule.scale.device)
    for weight, r in zip(weights, rows):
        for a in range(0, r.stop - r.start, rows_at_once):
            chunk = weight[a : a + rows_at_once].detach().to(device=WT.device, dtype=torch.float32, copy=True)
            chunk[:, dead] = 0
            at = slice(r.start + a, r.start + a + chunk.shape[0])
            if rule.static:  # per-channel always (one block), per-block under act-order
                k, b = chunk.shape[0], rule.block
                s, z = fit_grid(chunk.reshape(-1, b), rule.config.bits, rule.config.sym, rule.config.mse_clip,
                                grid=rule.config.grid)
                rule.set_grids(slice(None), s.reshape(k, -1), z.reshape(k, -1), rows=at)
            WT[:, at] = chunk.t() if perm is None else chunk.t()[perm]
    return WT


def _undamped_row_errors(error_sq, weight, cw, dead, added, rows_at_once=256) -> torch.Tensor:
    """(ΔW H ΔWᵀ)ⱼⱼ per row (float64 [out]) from the sweep's Σ eᵢ² = (ΔW H_d ΔWᵀ)ⱼⱼ, where
    H_d = H + added·I + (1 on dead columns' diagonal): minus added·|ΔWⱼ|² and |ΔWⱼ on dead columns|².
    ΔW = W₀ − Q with W₀'s dead columns zeroed (the matrix the sweep started from), a few rows at a time."""
    out = error_sq.clone()
    for r0 in range(0, weight.shape[0], rows_at_once):
        r = slice(r0, r0 + rows_at_once)
        q = cw.dequantize_rows(r).to(device=error_sq.device, dtype=torch.float32)
        delta = weight[r].to(device=q.device, dtype=torch.float32) - q
        delta[:, dead] = q[:, dead].neg()
        sq = delta.double().square_()
        out[r] -= added * sq.sum(dim=1) + sq[:, dead].sum(dim=1)
    return out


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

    def set_grids(self, blocks, scale, zero, rows=slice(None)):
        self.scale[rows, blocks], self.zero[rows, blocks] = scale, zero
        self.scale_t[blocks, rows], self.zero_t[blocks, rows] = scale.float().t(), zero.float().t()

    def start_batch(self, i1, batch, diag_u):
        pass

    def start_column(self, col, upcoming):
        if not self.static and col % self.block == 0:
            c = self.config
            self.set_grids(col // self.block, *fit_grid(upcoming(self.block), c.bits, c.sym, c.mse_clip, grid=c.grid))

    def round(self, col, w):
        # the same arithmetic as grid.quantize / grid.dequantize, on float32 copies of the grid
        b = self.block_of[col]
        s, z = self.scale_t[b], self.zero_t[b]
        q = torch.round(w / s).add_(z).clamp_(0, self.maxq)
        self.codes_t[col] = q  # integers in [0, maxq]: exact in uint8
        return (q - z).mul_(s).to(torch.float16).float()
