"""Round-to-nearest: the data-free bar every calibrated quantizer must clear."""

from __future__ import annotations

import torch

from ..formats import CompressedWeight
from .base import Solution
from .grid import fit_grid, quantize
from .quant_config import RTNConfig


def rtn(weight: torch.Tensor, hessian: torch.Tensor | None, config: RTNConfig) -> Solution:
    """weight: [out, in] → affine CompressedWeight on `config`'s grid. `hessian` is ignored."""
    out_f, in_f = weight.shape
    block = config.block_size or in_f
    blocks = weight.to(torch.float32).reshape(out_f * (in_f // block), block)
    scale, zero = fit_grid(blocks, config.bits, config.sym, config.mse_clip, grid=config.grid)
    codes = quantize(blocks, scale[:, None], zero[:, None], 2**config.bits - 1)
    return Solution(
        CompressedWeight(
            shape=(out_f, in_f),
            scheme="affine",
            bits=config.bits,
            codes=codes.reshape(out_f, in_f),
            scale=scale.reshape(out_f, -1),
            zero_point=zero.reshape(out_f, -1),
        )
    )
