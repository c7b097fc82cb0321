"""Magnitude pruning: the data-free bar every calibrated pruner must clear.

Also home of the mask arithmetic SparseGPT shares: exact zero counts, lowest-score masks, n:m
masks, and the sparse CompressedWeight forms (float16 values or affine codes, with a mask).
"""

from __future__ import annotations

from itertools import accumulate

import torch

from ..formats import CompressedWeight
from .base import Solution, to_float32
from .grid import fit_grid, quantize
from .sparse_config import MagnitudeConfig, SparseConfig


def prune_counts(sparsity: float, sizes: list[int]) -> list[int]:
    """Zeros per part such that every prefix of parts holds round(sparsity · its size).

    The total is then exactly round(sparsity · sum(sizes)) and each part differs from
    round(sparsity · size) by at most one.
    """
    targets = [round(sparsity * edge) for edge in accumulate([0, *sizes])]
    return [b - a for a, b in zip(targets, targets[1:])]


def keep_lowest(scores: torch.Tensor, prune: int | torch.Tensor) -> torch.Tensor:
    """bool keep-mask of scores: [rows, cols] with the `prune` lowest of each row False.

    `prune`: one count for every row or a [rows] tensor. Ties break by column (the order of a
    stable sort), so the mask is deterministic and the count exact. With one count for all rows the
    k-th smallest score is found by selection, not by sorting: everything below it is pruned, and
    of the scores equal to it the first ones by column, as many as the count still needs.
    """
    counts = torch.as_tensor(prune, device=scores.device).reshape(-1)
    if counts.numel() > 1 and bool((counts != counts[0]).any()):
        return _keep_lowest_sorted(scores, counts.reshape(-1, 1))
    k = int(counts[0])
    cols = scores.shape[1]
    if k <= 0 or k >= cols:
        return torch.full_like(scores, k <= 0, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < kth
    ties = scores == kth
    still = k - below.sum(dim=1, keepdim=True)  # ties to prune, first ones by column
    return ~(below | (ties & (ties.cumsum(dim=1) <= still)))


def _keep_lowest_sorted(scores: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """keep_lowest for a different count per row ([rows, 1]): ranks from a stable sort."""
    order = torch.argsort(scores, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks >= prune


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool keep-mask of scores: [rows, cols] keeping the n highest of every m consecutive columns."""
    return keep_lowest(scores.reshape(-1, m), m - n).reshape(scores.shape)


def sparse_weight(
    mask: torch.Tensor,
    config: SparseConfig,
    values: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> CompressedWeight:
    """Pure (float16 `values`) or joint (`codes` with `scale`/`zero` [out, blocks]) sparse weight;
    pruned entries get value 0 / code 0."""
    mask = mask.cpu()
    if config.bits is None:
        values = torch.where(mask, values.cpu().to(torch.float16), torch.zeros((), dtype=torch.float16))
        return CompressedWeight(shape=mask.shape, scheme="dense", values=values, mask=mask)
    codes = torch.where(mask, codes.cpu(), torch.zeros((), dtype=torch.uint8))
    return CompressedWeight(
        shape=mask.shape, scheme="affine", bits=config.bits,
        codes=codes, scale=scale.cpu(), zero_point=zero.cpu(), mask=mask,
    )


def magnitude(weight: torch.Tensor, hessian: torch.Tensor | None, config: MagnitudeConfig) -> Solution:
    """weight: [out, in] → sparse CompressedWeight keeping the largest |w|. `hessian` is ignored.

    Unstructured: each row gets its share of zeros (`prune_counts`) or, with granularity "layer",
    the round(sparsity · numel) smallest of the whole layer go. n:m keeps the n largest of every m.
    Joint: the grid (RTN, per block) is fitted on the kept weights only.
    """
    W = to_float32(weight)
    out_f, in_f = W.shape
    score = W.abs()
    if config.nm is not None:
        mask = nm_keep(score, *config.nm)
    elif config.granularity == "layer":
        mask = keep_lowest(score.reshape(1, -1), round(config.sparsity * W.numel())).reshape(W.shape)
    else:
        mask = keep_lowest(score, torch.tensor(prune_counts(config.sparsity, [in_f] * out_f)))
    if config.bits is None:
        return Solution(sparse_weight(mask, config, values=W))
    block = config.block_size or in_f
    blocks = W.reshape(-1, block)  # [out · in/block, block]
    scale, zero = fit_grid(blocks, config.bits, config.sym, config.mse_clip, mask=mask.reshape(-1, block))
    codes = quantize(blocks, scale[:, None], zero[:, None], 2**config.bits - 1).reshape(out_f, in_f)
    return Solution(
        sparse_weight(mask, config, codes=codes, scale=scale.reshape(out_f, -1), zero=zero.reshape(out_f, -1))
    )
