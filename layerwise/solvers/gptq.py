"""GPTQ (Frantar et al., 2022): quantize column by column, compensating each column's error on
the columns not yet quantized through the inverse Hessian, in lazy batches.

Per-block scales are fitted when the sweep reaches a block (from the already-updated weights), or,
with act-order, fixed up front from the unpermuted weight ("static groups"), so every block stays
contiguous in the original input order — the layout Core ML's blockwise ops need.
"""

from __future__ import annotations

import torch

from ..formats import CompressedWeight
from ..hessian import prepare_hessian
from .base import Solution, to_float32, upcoming_columns
from .grid import dequantize, fit_grid, quantize
from .quant_config import GPTQConfig


def gptq(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig) -> Solution:
    """weight: [out, in]; hessian: [in, in] float32 → affine CompressedWeight."""
    W = to_float32(weight)
    out_f, in_f = W.shape
    block = config.block_size or in_f
    n_blocks = in_f // block
    maxq = 2**config.bits - 1

    dead = torch.diag(hessian) == 0
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(hessian), descending=True) if config.act_order else None
    prepared = prepare_hessian(hessian, config.damp, perm=perm)
    Hinv = prepared.inverse_cholesky

    # Static grids: per-channel always (one block), per-block under act-order.
    static = config.act_order or n_blocks == 1
    scale = torch.ones(out_f, n_blocks, dtype=torch.float16, device=W.device)
    zero = torch.zeros(out_f, n_blocks, dtype=torch.uint8, device=W.device)
    if static:
        s, z = fit_grid(W.reshape(out_f * n_blocks, block), config.bits, config.sym, config.mse_clip)
        scale, zero = s.reshape(out_f, n_blocks), z.reshape(out_f, n_blocks)

    order = perm if perm is not None else torch.arange(in_f, device=W.device)
    if perm is not None:
        W = W[:, perm]
    block_of = order // block  # original block of each swept column
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)

    for i1 in range(0, in_f, config.lazy_batch):
        i2 = min(i1 + config.lazy_batch, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            b = int(block_of[col])
            if not static and col % block == 0:
                current = upcoming_columns(W1, W[:, i2:], i, block)  # the block's error-updated values
                scale[:, b], zero[:, b] = fit_grid(current, config.bits, config.sym, config.mse_clip)
            w = W1[:, i]
            q = quantize(w, scale[:, b], zero[:, b], maxq)
            codes[:, col] = q
            err = (w - dequantize(q, scale[:, b], zero[:, b]).float()) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    compressed = CompressedWeight(
        shape=(out_f, in_f), scheme="affine", bits=config.bits,
        codes=codes.cpu(), scale=scale.cpu(), zero_point=zero.cpu(),
    )
    return Solution(compressed, damping=prepared.damping, notes=prepared.notes)
