"""Palettization: every weight becomes an index into a small float16 look-up table (LUT) per group
of output channels — Core ML's `constexpr_lut_to_dense`.

- `kmeans`: plain k-means on the weights (data-free baseline).
- `skm`: sensitive k-means (SqueezeLLM; coremltools' SKMPalettizer): k-means weighted by each
  weight's sensitivity, H_jj for weight (i, j) by default, then a GPTQ-style sweep that snaps the
  columns one at a time to their group's nearest LUT entry and pushes each column's error onto the
  columns not yet snapped through the upper Cholesky factor of H⁻¹ (as in gptq.py), in lazy
  batches. Optionally joint with a sparsity mask: only kept weights are clustered, pruned weights
  are exactly zero (code 0) and their error is compensated like SparseGPT's.
"""

from __future__ import annotations

import torch

from ..errors import RecipeError
from ..formats import CompressedWeight
from ..hessian import PreparedHessian, dead_columns
from .base import Solution, prepare_for, stack_rows, to_float32
from .grid import FP16_TINY
from .kmeans import weighted_kmeans
from .magnitude import keep_lowest
from .palettize_config import KMeansConfig, SKMConfig
from .sweep import obs_sweep


def kmeans(weight: torch.Tensor, hessian: torch.Tensor | None, config: KMeansConfig) -> Solution:
    """weight: [out, in] → lut CompressedWeight by unweighted k-means. `hessian` is ignored."""
    W = to_float32(weight)
    config.check_shape(*W.shape, "weight")
    centroids, _ = _fit(W, None, None, config)
    lut, lut_codes, lut_scale = quantize_lut(centroids, config.lut_dtype)
    codes = _nearest_codes(W, lut.float(), config.group_out(W.shape[0]))
    return Solution(_compressed(W.shape, config.n_bits, codes, lut, lut_codes, lut_scale, None))


def skm(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: SKMConfig,
    *,
    sensitivity: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    prepared: PreparedHessian | None = None,
) -> Solution:
    """Sensitive k-means palettization of weight: [out, in] against hessian: [in, in] float32.

    sensitivity: [out, in] ≥ 0, required when `config.sensitivity == "fisher"` — the Python-API
        path, where the caller has run a loss on data and passes e.g. the squared gradients
        (diagonal Fisher) summed over the calibration set; it weights the k-means (and the refit),
        while the error feedback still uses `hessian`.
    mask: bool [out, in], True = kept: palettize only the kept weights (joint sparse + LUT). When
        `config.sparsity` is set and no mask is given, the smallest-magnitude weights of each row
        are pruned (a simple fallback; SparseGPT's mask is better).
    Returns a lut CompressedWeight (with the mask, if any) and the damping finally used.
    """
    return skm_group([weight], hessian, config, sensitivities=[sensitivity], masks=[mask], prepared=prepared)[0]


def skm_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor | None,
    config: SKMConfig,
    *,
    sensitivities: list[torch.Tensor | None] | None = None,
    masks: list[torch.Tensor | None] | None = None,
    prepared: PreparedHessian | None = None,
) -> list[Solution]:
    """`skm` for layers sharing one input: LUTs are fitted per layer (a LUT's group of output
    channels never straddles two layers), then one stacked error-feedback sweep snaps every row
    to its own group's LUT, and each layer's LUTs are refitted on its own rows.
    prepared: `prepare_for(hessian, config)` when the caller already has it (see gptq_group)."""
    n = len(weights)
    sensitivities, masks = sensitivities or [None] * n, masks or [None] * n
    if hessian is not None:
        hessian = hessian.to(weights[0].device, torch.float32)
    elif config.sensitivity == "hessian_diag" or config.error_feedback:
        raise ValueError(
            "skm needs the layer Hessian (only fisher sensitivity without error feedback does not)"
        )
    layers = [_fit_layer(w, hessian, config, s, m) for w, s, m in zip(weights, sensitivities, masks)]
    damping, prefix = None, []
    if config.error_feedback:
        if prepared is None:
            prepared = prepare_for(hessian, config)
        damping, prefix = prepared.damping, prepared.notes
        targets, rows = stack_rows([layer.W for layer in layers])
        stacked_mask = None
        if any(layer.mask is not None for layer in layers):
            stacked_mask = torch.cat([torch.ones_like(layer.W, dtype=torch.bool) if layer.mask is None else layer.mask
                                      for layer in layers])
        tables = [_sorted_rows(layer.lut.float(), layer.g_out) for layer in layers]
        values, order = (torch.cat([t[i] for t in tables]) for i in (0, 1))
        codes = _feedback_sweep(targets, values, order, prepared.cholesky_of_inverse, config.lazy_batch, stacked_mask)
        for layer, r in zip(layers, rows):
            layer.codes, layer.targets = codes[r], targets[r]
    else:
        for layer in layers:
            layer.codes, layer.targets = _nearest_codes(layer.W, layer.lut.float(), layer.g_out), layer.W
    return [_finish(layer, config, damping, prefix) for layer in layers]


class _Layer:
    """One layer of an SKM group: its weights, sensitivity, mask and fitted LUTs."""

    def __init__(self, W, S, mask, g_out, lut, notes):
        self.W, self.S, self.mask, self.g_out, self.notes = W, S, mask, g_out, notes
        self.lut, self.lut_codes, self.lut_scale = lut
        self.codes = self.targets = None


def _fit_layer(weight, hessian, config, sensitivity, mask) -> _Layer:
    W = to_float32(weight)
    out_f, in_f = W.shape
    config.check_shape(out_f, in_f, "weight")
    if hessian is not None:
        W[:, dead_columns(hessian)] = 0  # dead inputs: weight irrelevant, set to zero as GPTQ does
    S = _sensitivity(W, hessian, config.sensitivity, sensitivity)  # [out, in] or broadcastable [1, in]
    notes: list[str] = []
    if mask is None and config.sparsity:
        mask = keep_lowest(W.abs(), round(config.sparsity * in_f))  # per row, ties by column
        notes.append(f"sparsity {config.sparsity:g}: pruned the smallest weights of each row (no mask given)")
    if mask is not None:
        if tuple(mask.shape) != (out_f, in_f) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool {(out_f, in_f)}, got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(W.device)
    centroids, _ = _fit(W, S, mask, config)
    return _Layer(W, S, mask, config.group_out(out_f), quantize_lut(centroids, config.lut_dtype), notes)


def _finish(layer: _Layer, config, damping, prefix) -> Solution:
    codes, lut, lut_codes, lut_scale = layer.codes, layer.lut, layer.lut_codes, layer.lut_scale
    if layer.mask is not None:
        codes = torch.where(layer.mask, codes, 0)
    if config.refit_lut:
        # the mean of the error-corrected values each entry was snapped from, not of the original
        # weights: refitting to the originals undoes part of the feedback (measured: worse)
        centroids = refit_lut(layer.targets, layer.S, codes, layer.mask, lut.float(), layer.g_out)
        lut, lut_codes, lut_scale = quantize_lut(centroids, config.lut_dtype)
    compressed = _compressed(layer.W.shape, config.n_bits, codes, lut, lut_codes, lut_scale, layer.mask)
    return Solution(compressed, damping=damping, notes=list(prefix) + layer.notes)


def _sensitivity(W, hessian, kind, given) -> torch.Tensor:
    """Per-weight k-means weights: H_jj broadcast as [1, in], or the caller's Fisher [out, in]."""
    if kind == "hessian_diag":
        if given is not None:
            raise RecipeError("a sensitivity tensor was passed but the recipe says sensitivity: hessian_diag")
        return torch.diag(hessian)[None, :]
    if given is None or tuple(given.shape) != tuple(W.shape):
        raise RecipeError(
            f"sensitivity: fisher needs a per-weight sensitivity tensor of shape {tuple(W.shape)} "
            "(e.g. squared gradients of the loss) passed to skm(sensitivity=…); use "
            "sensitivity: hessian_diag to weight by the layer Hessian instead"
        )
    return given.to(W.device, torch.float32).clamp(min=0)


def quantize_lut(centroids: torch.Tensor, lut_dtype: str):
    """centroids [G, k] float32 → (lut float16 [G, k], lut_codes [G, k] | None, lut_scale [G, 1] | None).

    float16: the centroids rounded to float16. int8 / uint8: one float16 scale per LUT, codes =
    round(c / scale), and lut = float16(lut_codes · lut_scale) — exactly what the format computes.
    The format holds no LUT offset, so uint8 works only for LUTs whose entries share one sign
    (the scale is negative for all-negative LUTs).
    """
    if lut_dtype == "float16":
        return centroids.to(torch.float16), None, None
    lo = centroids.amin(dim=1, keepdim=True)
    hi = centroids.amax(dim=1, keepdim=True)
    amax = torch.maximum(-lo, hi)
    if lut_dtype == "int8":
        qmin, qmax, dtype, sign = -128, 127, torch.int8, torch.ones_like(amax)
    else:
        mixed = (lo < 0) & (hi > 0)
        if bool(mixed.any()):
            g = int(mixed.nonzero()[0, 0])
            raise RecipeError(
                f"lut_dtype='uint8' cannot hold LUT {g} (entries from {float(lo[g]):.4g} to "
                f"{float(hi[g]):.4g}): the quantized-LUT format has no offset, so a uint8 LUT's "
                "entries must share one sign; use lut_dtype: int8"
            )
        qmin, qmax, dtype = 0, 255, torch.uint8
        sign = torch.where(hi > 0, 1.0, -1.0)
    scale = (sign * torch.clamp(amax / qmax, min=FP16_TINY)).to(torch.float16)
    codes = torch.round(centroids / scale.float()).clamp(qmin, qmax)
    lut = (codes * scale.float()).to(torch.float16)
    return lut, codes.to(dtype), scale


def refit_lut(W, S, codes, mask, lut, g_out) -> torch.Tensor:
    """Each LUT entry → the sensitivity-weighted mean of the values W: [out, in] assigned to it
    (codes: [out, in], S: sensitivity broadcastable to W, mask: kept weights or None).

    Returns [G, k] float32; entries no kept weight uses keep their value from lut: [G, k].
    """
    out_f, in_f = W.shape
    G, k = lut.shape
    slot = (torch.arange(out_f, device=W.device) // g_out)[:, None] * k + codes.long()  # [out, in]
    s = S.to(torch.float32).expand(out_f, in_f)
    s = s if mask is None else s * mask
    num = torch.zeros(G * k, dtype=torch.float64, device=W.device)
    den = torch.zeros(G * k, dtype=torch.float64, device=W.device)
    num.index_add_(0, slot.reshape(-1), (s * W).reshape(-1).double())
    den.index_add_(0, slot.reshape(-1), s.reshape(-1).double())
    used = (den > 0).reshape(G, k)
    return torch.where(used, (num / den.clamp(min=1e-300)).reshape(G, k).float(), lut)


# ---- internals --------------------------------------------------------------------------------


def _fit(W, S, mask, config):
    """k-means over each group of config.group_out(out) rows; centroids [G, k] float32 sorted."""
    out_f, in_f = W.shape
    G = out_f // config.group_out(out_f)
    weights = None if S is None else S.expand(out_f, in_f).reshape(G, -1)
    valid = None if mask is None else mask.reshape(G, -1)
    return weighted_kmeans(
        W.reshape(G, -1), weights, 2**config.n_bits, config.seed, config.max_iters, config.tol, valid
    )


def _sorted_rows(lut: torch.Tensor, g_out: int):
    """Per output row: its group's LUT sorted ([out, k] float32), the sort order, and the midpoints
    between neighbouring sorted entries ([out, k - 1] float64, exact)."""
    values, order = torch.sort(lut, dim=1, stable=True)
    values, order = values.repeat_interleave(g_out, dim=0), order.repeat_interleave(g_out, dim=0)
    mid = (values[:, 1:].double() + values[:, :-1].double()) / 2
    return values, order, mid.contiguous()


def _nearest_codes(W, lut, g_out) -> torch.Tensor:
    """uint8 [out, in]: index of each weight's nearest entry in its group's LUT (lut: [G, k])."""
    values, order, mid = _sorted_rows(lut, g_out)
    pos = torch.searchsorted(mid, W.double().contiguous())  # [out, in] positions in sorted LUT
    return order.gather(1, pos).to(torch.uint8)


def _feedback_sweep(W, values, order, U, lazy_batch, mask) -> torch.Tensor:
    """GPTQ's sweep (sweep.py) with "round" = snap to the nearest LUT entry (or 0 where pruned).

    W: [out, in] float32, overwritten with each column's value at the moment it was snapped
    (the error-corrected targets); values, order: [out, k] each row's LUT sorted, and the sort
    order (`_sorted_rows`); U: [in, in] upper Cholesky factor of H⁻¹. Returns codes uint8 [out, in].
    """
    rule = _SnapRule(values, mask, W.shape[1])
    obs_sweep(W, U, rule, lazy_batch)
    return order.gather(1, rule.pos_t.t()).to(torch.uint8)


class _SnapRule:
    """SKM's column rule: the nearest entry of each row's LUT, zero where the mask prunes."""

    def __init__(self, values, mask, in_f):
        self.values = values
        self.mask_t = None if mask is None else mask.t().contiguous()  # one contiguous row per column
        self.values64 = values.double()  # [out, k]: a per-column argmin over k beats searchsorted's overhead
        self.pos_t = torch.zeros(in_f, values.shape[0], dtype=torch.int64, device=values.device)  # index into sorted LUT

    def start_batch(self, i1, batch, diag_u):
        pass

    def start_column(self, col, upcoming):
        pass

    def round(self, col, w):
        # nearest sorted entry; exact in float64, ties to the lower entry like searchsorted(mid)
        p = (w.double()[:, None] - self.values64).abs().argmin(dim=1, keepdim=True)  # [out, 1]
        self.pos_t[col] = p.squeeze(1)
        q = self.values.gather(1, p).squeeze(1)
        return q if self.mask_t is None else torch.where(self.mask_t[col], q, 0.0)


def _compressed(shape, bits, codes, lut, lut_codes, lut_scale, mask) -> CompressedWeight:
    G, k = lut.shape
    return CompressedWeight(
        shape=tuple(shape),
        scheme="lut",
        bits=bits,
        codes=codes.to(torch.uint8).cpu(),
        lut=lut.reshape(G, 1, k).cpu(),
        lut_codes=None if lut_codes is None else lut_codes.reshape(G, 1, k).cpu(),
        lut_scale=None if lut_scale is None else lut_scale.reshape(G, 1, 1).cpu(),
        mask=None if mask is None else mask.cpu(),
    )
