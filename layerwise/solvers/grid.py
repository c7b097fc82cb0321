"""Uniform (affine) quantization grids with float16 scales, shared by RTN, GPTQ and SparseGPT."""

from __future__ import annotations

import torch

FP16_TINY = 2.0**-14  # smallest normal float16: scales never go below it


def fit_grid(
    w: torch.Tensor, bits: int, sym: bool, mse_clip: bool = False, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for w: [rows, cols] (each row is one block or channel).

    Returns scale: float16 [rows], zero_point: uint8 [rows]. The scale is rounded to float16 *before*
    anything is quantized with it, so every later use sees the exact float16 value.
    With `mse_clip`, the range is shrunk (1.00 → 0.20 in 1 % steps) to minimise Σ|q(w) − w|^2.4,
    as in GPTQ's reference. `mask` (bool, same shape) restricts the range to kept weights.
    """
    maxq = 2**bits - 1
    w = w.to(torch.float32)
    if mask is not None:
        big = torch.finfo(torch.float32).max
        lo = torch.where(mask, w, torch.full_like(w, big)).amin(dim=1).clamp(max=0)
        hi = torch.where(mask, w, torch.full_like(w, -big)).amax(dim=1).clamp(min=0)
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
    scale, zero = _grid_from_range(lo, hi, maxq, sym)
    if not mse_clip:
        return scale, zero
    weight = None if mask is None else mask.to(torch.float32)
    best = _grid_error(w, scale, zero, maxq, weight)
    for i in range(1, 81):
        shrink = 1 - i / 100
        s, z = _grid_from_range(lo * shrink, hi * shrink, maxq, sym)
        err = _grid_error(w, s, z, maxq, weight)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _grid_from_range(lo, hi, maxq, sym):
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    span = hi - lo
    scale = (span / maxq).clamp(min=FP16_TINY)
    scale = torch.where(span > 0, scale, torch.ones_like(scale)).to(torch.float16)
    if sym:
        zero = torch.full_like(lo, (maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale.float()).clamp(0, maxq)
    return scale, zero.to(torch.uint8)


def _grid_error(w, scale, zero, maxq, weight):
    q = quantize(w, scale[:, None], zero[:, None], maxq)
    err = (dequantize(q, scale[:, None], zero[:, None]).float() - w).abs().pow(2.4)
    if weight is not None:
        err = err * weight
    return err.sum(dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest grid codes (uint8) of w under broadcastable float16 scale / uint8 zero."""
    q = torch.round(w.to(torch.float32) / scale.float()) + zero.float()
    return q.clamp(0, maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float16 grid values: one rounding of the exact float32 product (same as CompressedWeight)."""
    return ((codes.float() - zero.float()) * scale.float()).to(torch.float16)


def quantize_dequantize(w, scale, zero, maxq) -> torch.Tensor:
    """float32 view of the nearest grid value (what GPTQ's sweep carries forward)."""
    return dequantize(quantize(w, scale, zero, maxq), scale, zero).float()
