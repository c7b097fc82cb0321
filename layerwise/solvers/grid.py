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
    as in GPTQ's reference (searched coarse to fine, `_clipped_grid`). `mask` (bool, same shape) restricts the range to kept weights.
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
    return _clipped_grid(w, lo, hi, maxq, sym, weight)


SHRINKS = torch.tensor([1 - i / 100 for i in range(81)])  # the MSE-clipping search's range factors
COARSE = 4  # the search's first pass tries every COARSE-th factor, the second the ones around its best
CHUNK = 1 << 18  # candidate × row × column elements evaluated at once (about 1 MB per temporary)


def _clipped_grid(w, lo, hi, maxq, sym, weight):
    """The grid of the shrink factor with the least Σ weight·|q(w) − w|^2.4 per row (ties: the
    widest range). Coarse to fine: every COARSE-th factor, then the COARSE − 1 on each side of the
    best of those (27 of the 81 factors; the exhaustive search's answer whenever its optimum lies
    within COARSE − 1 steps of the coarse optimum). Each pass evaluates all its factors at once."""
    rows = w.shape[0]
    coarse = torch.arange(0, len(SHRINKS), COARSE, device=w.device)[:, None].expand(-1, rows)
    err = _candidate_errors(w, lo, hi, maxq, sym, weight, coarse)
    first = coarse.gather(0, err.argmin(dim=0, keepdim=True))  # [1, rows]
    offsets = torch.tensor([o for o in range(1 - COARSE, COARSE) if o], device=w.device)[:, None]
    fine = (first + offsets).clamp(0, len(SHRINKS) - 1)
    idx = torch.cat([first, fine])
    err = torch.cat([err.min(dim=0, keepdim=True).values, _candidate_errors(w, lo, hi, maxq, sym, weight, fine)])
    best = torch.where(err == err.min(dim=0, keepdim=True).values, idx, len(SHRINKS)).amin(dim=0)
    shrink = SHRINKS.to(w.device)[best]
    return _grid_from_range(lo * shrink, hi * shrink, maxq, sym)


def _candidate_errors(w, lo, hi, maxq, sym, weight, idx):
    """[K, rows] errors of the grids of shrink factors SHRINKS[idx] (idx: [K, rows]), in chunks of rows."""
    shrink = SHRINKS.to(w.device)[idx]
    scale, zero = _grid_from_range(lo[None, :] * shrink, hi[None, :] * shrink, maxq, sym)  # [K, rows]
    rows, cols = w.shape
    err = torch.empty(idx.shape, device=w.device)
    step = max(1, CHUNK // (idx.shape[0] * cols))
    for r0 in range(0, rows, step):
        r = slice(r0, r0 + step)
        err[:, r] = _grid_errors(w[r], scale[:, r], zero[:, r], maxq, None if weight is None else weight[r])
    return err


def _grid_errors(w, scale, zero, maxq, weight):
    """[K, rows] Σ_cols weight·|q(w) − w|^2.4 of w: [rows, cols] on K grids (scale, zero: [K, rows]),
    with the arithmetic of quantize / dequantize. The centred code round(w/s) is clamped to
    [−z, maxq − z]: the integers of clamp(round(w/s) + z, 0, maxq) − z in two operations fewer."""
    s = scale.float()[:, :, None]
    z = zero.float()[:, :, None]
    q = torch.div(w[None], s).round_().clamp_(-z, maxq - z)
    err = q.mul_(s).to(torch.float16).float().sub_(w[None]).abs_().pow_(2.4)
    if weight is not None:
        err.mul_(weight[None])
    return err.sum(dim=2)


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
