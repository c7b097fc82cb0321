"""Uniform (affine) quantization grids with float16 scales, shared by RTN, GPTQ and SparseGPT."""

from __future__ import annotations

import torch

FP16_TINY = 2.0**-14  # smallest normal float16: scales never go below it
FP16_SIGNIFICAND = 11  # bits of a float16 significand (the implicit one included)
GRIDS = ("float16", "mlx", "gguf")  # where a scale may lie (`scale_significand`)


def scale_significand(grid: str, bits: int, sym: bool) -> int:
    """Significant bits a scale may have on `grid` so that a target's reader decodes our weights exactly.

    float16: any float16 scale (our own dequantization, fp16(s·(q − z)), is exact by construction).
    mlx: MLX computes w = s·q + b with b = −s·z, codes q ∈ [0, 2^bits), rounding each product and
    sum to float16 (CPU `dequantize`) or in float32 (matmul kernels). A scale of 11 − bits
    significant bits makes s·q, s·z and s·(q − z) exact float16 numbers, so every such order of
    arithmetic gives fp16(s·(q − z)) unrounded.
    gguf: readers compute d·k (+ m) in float32 with k = q − z (Q4_0, Q5_0, Q8_0: |k| ≤ 2^(bits−1);
    Q4_1, Q5_1: q ∈ [0, 2^bits), m = −s·z). s·k must be an exact float16 for every k: 12 − bits
    significant bits on a symmetric grid (the largest non-power-of-two |k| has bits − 1 bits),
    11 − bits on an asymmetric one. An mlx scale is also a gguf scale.
    """
    if grid == "float16":
        return FP16_SIGNIFICAND
    if grid == "mlx":
        return FP16_SIGNIFICAND - bits
    if grid == "gguf":
        return FP16_SIGNIFICAND - bits + (1 if sym else 0)
    raise ValueError(f"unknown grid {grid!r}; use one of {GRIDS}")


def round_scale(scale: torch.Tensor, significand: int) -> torch.Tensor:
    """float32 scales (positive, normal in float16) → float16 with at most `significand` significant
    bits. Below float16's own 11, rounded up: a coarser step never shrinks the range it covers."""
    if significand >= FP16_SIGNIFICAND:
        return scale.to(torch.float16)
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa · 2^exponent, mantissa ∈ [0.5, 1)
    steps = torch.ceil(mantissa * 2.0**significand)  # ≤ 2^significand: at most 2^exponent, on every lattice
    rounded = torch.ldexp(steps, (exponent - significand).float())
    largest = 2.0**15 * (2 - 2.0 ** (1 - significand))  # the lattice's largest finite float16
    return rounded.clamp(max=largest).to(torch.float16)


def fit_grid(
    w: torch.Tensor, bits: int, sym: bool, mse_clip: bool = False, mask: torch.Tensor | None = None,
    grid: str = "float16",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for w: [rows, cols] (each row is one block or channel).

    Returns scale: float16 [rows], zero_point: uint8 [rows]. The scale is rounded to float16 *before*
    anything is quantized with it, so every later use sees the exact float16 value.
    With `mse_clip`, the range is shrunk (1.00 → 0.20 in 1 % steps) to minimise Σ|q(w) − w|^2.4,
    as in GPTQ's reference (searched coarse to fine, `_clipped_grid`). `mask` (bool, same shape) restricts the range to kept weights.
    grid: the lattice the scales lie on (`scale_significand`).
    """
    maxq = 2**bits - 1
    sig = scale_significand(grid, bits, sym)
    w = w.to(torch.float32)
    if mask is not None:
        big = torch.finfo(torch.float32).max
        lo = torch.where(mask, w, torch.full_like(w, big)).amin(dim=1).clamp(max=0)
        hi = torch.where(mask, w, torch.full_like(w, -big)).amax(dim=1).clamp(min=0)
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
    scale, zero = _grid_from_range(lo, hi, maxq, sym, sig)
    if not mse_clip:
        return scale, zero
    weight = None if mask is None else mask.to(torch.float32)
    return _clipped_grid(w, lo, hi, maxq, sym, weight, sig)


SHRINKS = torch.tensor([1 - i / 100 for i in range(81)])  # the MSE-clipping search's range factors
COARSE = 4  # the search's first pass tries every COARSE-th factor, the second the ones around its best
STOP = 2.0  # the first pass stops once every row's error is above STOP × its best so far
GROUP = 3  # first-pass factors evaluated together (and checked against STOP together)
CHUNK = 1 << 18  # candidate × row × column elements evaluated at once (about 1 MB per temporary)


def _clipped_grid(w, lo, hi, maxq, sym, weight, sig):
    """The grid of the shrink factor with the least Σ weight·|q(w) − w|^2.4 per row (ties: the
    widest range). Coarse to fine: every COARSE-th factor from the widest range down, then all
    factors within COARSE − 1 steps of the best of those, exactly. The exhaustive search's answer
    whenever its optimum lies that close to the coarse optimum.

    The coarse pass only locates the optimum, so it is cheaper: the error in units of the scale
    without the float16 round trip of the grid values (the fine pass has it), and it stops once every
    row's error exceeds STOP × its best so far (shrinking the range further only clips more)."""
    first = _coarse_optimum(w, lo, hi, maxq, sym, weight, sig)  # [rows]
    offsets = torch.arange(1 - COARSE, COARSE, device=w.device)[:, None]
    fine = (first[None] + offsets).clamp(0, len(SHRINKS) - 1)  # [2·COARSE − 1, rows]
    err = _candidate_errors(w, lo, hi, maxq, sym, weight, fine, sig)
    best = torch.where(err == err.min(dim=0, keepdim=True).values, fine, len(SHRINKS)).amin(dim=0)
    shrink = SHRINKS.to(w.device)[best]
    return _grid_from_range(lo * shrink, hi * shrink, maxq, sym, sig)


def _coarse_optimum(w, lo, hi, maxq, sym, weight, sig):
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
            scale, zero = _grid_from_range(lo[None, r] * shrinks[idx, None], hi[None, r] * shrinks[idx, None], maxq, sym,
                                           sig)
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


def _candidate_errors(w, lo, hi, maxq, sym, weight, idx, sig):
    """[K, rows] errors of the grids of shrink factors SHRINKS[idx] (idx: [K, rows]), in chunks of rows."""
    shrink = SHRINKS.to(w.device)[idx]
    scale, zero = _grid_from_range(lo[None, :] * shrink, hi[None, :] * shrink, maxq, sym, sig)  # [K, rows]
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


def _grid_from_range(lo, hi, maxq, sym, sig=FP16_SIGNIFICAND):
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    span = hi - lo
    scale = (span / maxq).clamp(min=FP16_TINY)
    scale = round_scale(torch.where(span > 0, scale, torch.ones_like(scale)), sig)
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
