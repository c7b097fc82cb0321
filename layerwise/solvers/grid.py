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
STOP = 2.0  # the first pass stops once every row's error is above STOP × its best so far
GROUP = 3  # first-pass factors evaluated together (and checked against STOP together)
CHUNK = 1 << 18  # candidate × row × column elements evaluated at once (about 1 MB per temporary)


def _clipped_grid(w, lo, hi, maxq, sym, weight):
    """The grid of the shrink factor with the least Σ weight·|q(w) − w|^2.4 per row (ties: the
    widest range). Coarse to fine: every COARSE-th factor from the widest range down, then all
    factors within COARSE − 1 steps of the best of those, exactly. The exhaustive search's answer
    whenever its optimum lies that close to the coarse optimum.

    The coarse pass only locates the optimum, so it is cheaper: the error in units of the scale
    without the float16 round trip of the grid values (the fine pass has it), and it stops once every
    row's error exceeds STOP × its best so far (shrinking the range further only clips more)."""
    first = _coarse_optimum(w, lo, hi, maxq, sym, weight)  # [rows]
    offsets = torch.arange(1 - COARSE, COARSE, device=w.device)[:, None]
    fine = (first[None] + offsets).clamp(0, len(SHRINKS) - 1)  # [2·COARSE − 1, rows]
    err = _candidate_errors(w, lo, hi, maxq, sym, weight, fine)
    best = torch.where(err == err.min(dim=0, keepdim=True).values, fine, len(SHRINKS)).amin(dim=0)
    shrink = SHRINKS.to(w.device)[best]
    return _grid_from_range(lo * shrink, hi * shrink, maxq, sym)


def _coarse_optimum(w, lo, hi, maxq, sym, weight):
    """[rows] index of the least-error factor among every COARSE-th one (see `_clipped_grid`)."""
    rows, cols = w.shape
    coarse = torch.arange(0, len(SHRINKS), COARSE, device=w.device)
    shrinks = SHRINKS.to(w.device)
    best_err = torch.full((rows,), float("inf"), device=w.device)
    best = torch.zeros(rows, dtype=torch.long, device=w.device)
    step = max(1, CHUNK // (GROUP * cols))
    for r0 in range(0, rows, step):
        r = slice(r0, r0 + step)
        wr, wt = w[r], None if weight is None else weight[r]
        for g0 in range(0, len(coarse), GROUP):
            idx = coarse[g0 : g0 + GROUP]
            scale, zero = _grid_from_range(lo[None, r] * shrinks[idx, None], hi[None, r] * shrinks[idx, None], maxq, sym)
            err = _scaled_errors(wr, scale, zero, maxq, sym, wt)  # [GROUP, rows of r]
            low, at = err.min(dim=0)
            better = low < best_err[r]  # strictly: ties keep the wider range
            best_err[r] = torch.where(better, low, best_err[r])
            best[r] = torch.where(better, idx[at], best[r])
            if bool((low > STOP * best_err[r]).all()):
                break
    return best


def _scaled_errors(w, scale, zero, maxq, sym, weight):
    """[K, rows] s^2.4 · Σ_cols weight·|q − w/s|^2.4, q the clamped nearest code of w/s: the grid
    error of `_grid_errors` without rounding the grid values to float16."""
    s = scale.float()[:, :, None]
    x = torch.div(w[None], s)
    q = _clamped_codes(x.round(), zero, maxq, sym)
    err = q.sub_(x).abs_().pow_(2.4)
    if weight is not None:
        err.mul_(weight[None])
    return err.sum(dim=2).mul_(s[:, :, 0].pow(2.4))


def _clamped_codes(q, zero, maxq, sym):
    """q (rounded w/s: [K, rows, cols]) clamped to the codes of grids with zero points `zero`
    ([K, rows]), centred (code − zero), in place. Symmetric grids share one zero point: a scalar
    clamp, much cheaper than a clamp to tensor bounds."""
    if sym:
        z = (maxq + 1) // 2
        return q.clamp_(-z, maxq - z)
    z = zero.float()[:, :, None]
    torch.maximum(q, -z, out=q)
    return torch.minimum(q, maxq - z, out=q)


def _candidate_errors(w, lo, hi, maxq, sym, weight, idx):
    """[K, rows] errors of the grids of shrink factors SHRINKS[idx] (idx: [K, rows]), in chunks of rows."""
    shrink = SHRINKS.to(w.device)[idx]
    scale, zero = _grid_from_range(lo[None, :] * shrink, hi[None, :] * shrink, maxq, sym)  # [K, rows]
    rows, cols = w.shape
    err = torch.empty(idx.shape, device=w.device)
    step = max(1, CHUNK // (idx.shape[0] * cols))
    for r0 in range(0, rows, step):
        r = slice(r0, r0 + step)
        err[:, r] = _grid_errors(w[r], scale[:, r], zero[:, r], maxq, sym, None if weight is None else weight[r])
    return err


def _grid_errors(w, scale, zero, maxq, sym, weight):
    """[K, rows] Σ_cols weight·|q(w) − w|^2.4 of w: [rows, cols] on K grids (scale, zero: [K, rows]),
    with the arithmetic of quantize / dequantize (the centred code: two operations fewer)."""
    s = scale.float()[:, :, None]
    q = _clamped_codes(torch.div(w[None], s).round_(), zero, maxq, sym)
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
