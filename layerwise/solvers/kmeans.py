"""Weighted 1-D k-means (Lloyd) for many groups at once, exact and O(n) in memory.

Scalar centroids make every Lloyd step cheap: with each group's values sorted once, the clusters
are contiguous runs between the midpoints of neighbouring centroids, so an assignment is k - 1
`searchsorted`s and a cluster's weighted mean is a difference of two prefix sums. One iteration
costs O(G · k · log n) after an O(G · n log n) sort, whatever n is.
"""

from __future__ import annotations

import torch

MIN_WEIGHT = 1e-6  # weights are floored at this fraction of their group's mean weight
INIT_BUCKETS = 1024  # k-means++ runs on a coreset of at least this many points per group


def weighted_kmeans(
    values: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    seed: int = 0,
    max_iters: int = 30,
    tol: float = 1e-4,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each row of `values` into k scalar centroids minimising Σ weight · (value − centroid)².

    values: [G, n] float; weights: [G, n] ≥ 0 (None = uniform); valid: [G, n] bool (None = all):
    entries outside it take no part in the fit. Returns centroids [G, k] float32 sorted ascending
    and assignment [G, n] int64 (index of the nearest centroid, for invalid entries too).

    - k-means++ initialisation, weighted by `weights`, from a torch.Generator seeded with `seed`;
    - an empty cluster is re-seeded at the point with the largest weighted error of its group;
    - stops when no centroid moved more than `tol` × (value range of its group), or at max_iters;
    - a group with ≤ k distinct values gets exactly those values (the last one repeated).
    Zero weights are floored at MIN_WEIGHT × the group's mean so such points still count a little
    (a group whose weights are all zero is clustered unweighted).
    """
    G, n = values.shape
    device = values.device
    x = values.to(torch.float32)
    valid = torch.ones(G, n, dtype=torch.bool, device=device) if valid is None else valid
    n_valid = valid.sum(dim=1)  # [G]
    w = _floored_weights(x, weights, valid, n_valid)

    # sort once; invalid entries go to the end as +inf with weight 0
    xs, order = torch.sort(torch.where(valid, x, torch.inf), dim=1, stable=True)  # [G, n]
    ws = w.gather(1, order)
    del order
    zero = torch.zeros(G, 1, dtype=torch.float64, device=device)
    cum_w = torch.cat([zero, ws.double().cumsum(dim=1)], dim=1)  # [G, n + 1]
    cum_wx = torch.cat([zero, (ws.double() * torch.where(ws > 0, xs, 0.0).double()).cumsum(dim=1)], dim=1)

    last = (n_valid - 1).clamp(min=0)[:, None]
    lo = torch.where(n_valid[:, None] > 0, xs[:, :1], 0.0)
    hi = torch.where(n_valid[:, None] > 0, xs.gather(1, last), 0.0)
    spread = (hi - lo).squeeze(1)  # [G]

    # groups with at most k distinct values: the values themselves are the optimum (zero error)
    is_new = torch.ones_like(valid)
    is_new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    is_new &= torch.arange(n, device=device)[None, :] < n_valid[:, None]
    distinct = is_new.sum(dim=1)  # [G]
    exact = distinct <= k

    generator = torch.Generator(device=device).manual_seed(seed)
    c = _kmeans_pp(xs, cum_w, cum_wx, n_valid, k, generator)  # [G, k] sorted
    c = _lloyd(xs, ws, cum_w, cum_wx, c, ~exact & (spread > 0), spread, max_iters, tol)

    if bool(exact.any()):
        rank = is_new.cumsum(dim=1) - 1  # index of each entry's value among its row's distinct values
        c = torch.where(exact[:, None], _distinct_table(xs, is_new, rank, distinct, k), c)
    return c, nearest(x, c)


def _floored_weights(x, weights, valid, n_valid) -> torch.Tensor:
    """[G, n] float32: the weights ≥ 0, zero outside `valid`, uniform for a group weighted all zero,
    and floored at MIN_WEIGHT × the group's mean weight inside it."""
    w = torch.ones_like(x) if weights is None else weights.to(torch.float32).clamp(min=0)
    w = torch.where(valid, w, 0.0)
    w = torch.where(w.sum(dim=1, keepdim=True) > 0, w, valid.float())  # all-zero → uniform
    mean_w = w.sum(dim=1, keepdim=True) / n_valid.clamp(min=1)[:, None]
    return torch.where(valid, torch.maximum(w, MIN_WEIGHT * mean_w), 0.0)


def _lloyd(xs, ws, cum_w, cum_wx, c, active, spread, max_iters, tol) -> torch.Tensor:
    """Lloyd steps from the sorted centroids c [G, k] over the sorted rows xs [G, n] (weights ws,
    prefix sums cum_w / cum_wx [G, n + 1]) until no `active` group's centroid moves more than
    tol × its spread [G] and no empty cluster was re-seeded, or max_iters; returns c sorted."""
    for _ in range(max_iters if bool(active.any()) else 0):
        bounds = _bounds(xs, c)  # [G, k + 1]
        sw = cum_w.gather(1, bounds).diff(dim=1)  # [G, k]
        swx = cum_wx.gather(1, bounds).diff(dim=1)
        empty = bounds[:, 1:] == bounds[:, :-1]
        new = torch.where(empty, c.double(), swx / sw.clamp(min=torch.finfo(torch.float64).tiny)).float()
        repaired = empty & active[:, None]
        if bool(repaired.any()):
            new = _reseed_empty(xs, ws, new, repaired)
        new, _ = torch.sort(new, dim=1)
        shift = (new - c).abs().amax(dim=1)
        c = new
        if not bool((active & ((shift > tol * spread) | repaired.any(dim=1))).any()):
            break
    return c


def _distinct_table(xs, is_new, rank, distinct, k) -> torch.Tensor:
    """[G, k]: the distinct values of each (sorted) row, the last one repeated to fill k slots."""
    G = xs.shape[0]
    table = torch.zeros(G, k + 1, dtype=torch.float32, device=xs.device)
    # repeats (and rows with more than k distinct values, not used) go to a spare slot
    slot = torch.where(is_new & (rank < k), rank, torch.full_like(rank, k))
    table.scatter_(1, slot, torch.where(is_new, xs, 0.0))
    pad = torch.minimum(torch.arange(k, device=xs.device)[None, :], (distinct[:, None] - 1).clamp(min=0))
    return table[:, :k].gather(1, pad)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted centroids [G, k] for every x [G, n] (ties go low)."""
    c = centroids.double()
    mid = (c[:, 1:] + c[:, :-1]) / 2  # [G, k - 1], exact in float64 for float32 centroids
    return torch.searchsorted(mid.contiguous(), x.double().contiguous())


def _bounds(xs: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Cluster j of each sorted row is xs[:, b[j]:b[j+1]]; b: [G, k + 1] int64."""
    G, n = xs.shape
    mid = ((c[:, 1:].double() + c[:, :-1].double()) / 2).float()
    inner = torch.searchsorted(xs, mid.contiguous())  # first index with xs >= mid
    first = torch.zeros(G, 1, dtype=torch.int64, device=xs.device)
    end = torch.full((G, 1), n, dtype=torch.int64, device=xs.device)
    return torch.cat([first, inner, end], dim=1)


def _kmeans_pp(xs, cum_w, cum_wx, n_valid, k, generator) -> torch.Tensor:
    """Weighted k-means++ on a coreset of each sorted row; returns [G, k] sorted.

    The coreset cuts each row's valid entries into m = max(INIT_BUCKETS, 16k) runs of consecutive
    sorted values, each standing for its weighted mean with its total weight (exact for 1-D
    k-means up to the within-run spread); rows with at most m entries are used as they are.
    """
    G, n = xs.shape
    m = max(INIT_BUCKETS, 16 * k)
    if n > m:
        edges = torch.arange(m + 1, device=xs.device, dtype=torch.float64) / m
        edges = (edges[None, :] * n_valid[:, None]).round().long()  # [G, m + 1] bucket bounds
        pw = cum_w.gather(1, edges).diff(dim=1)
        px = (cum_wx.gather(1, edges).diff(dim=1) / pw.clamp(min=torch.finfo(torch.float64).tiny)).float()
        pw = pw.float()
    else:
        px, pw = xs, torch.diff(cum_w, dim=1).float()
    ok = torch.isfinite(px) & (pw > 0)
    px = torch.where(ok, px, 0.0)
    pw = torch.where(ok, pw, 0.0)
    pw = torch.where(pw.sum(dim=1, keepdim=True) > 0, pw, torch.ones_like(pw))  # empty groups
    centroids = torch.empty(G, k, dtype=torch.float32, device=xs.device)
    cdf_w = pw.cumsum(dim=1)  # fallback once every point is a centroid already
    d2 = torch.full_like(px, torch.inf)
    tmp, buf = torch.empty_like(px), torch.empty_like(px)
    cdf = cdf_w
    for j in range(k):
        u = torch.rand(G, 1, generator=generator, device=xs.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp(max=px.shape[1] - 1)  # first cdf > u
        centroids[:, j : j + 1] = px.gather(1, pick)
        torch.sub(px, centroids[:, j : j + 1], out=tmp).square_()
        torch.minimum(d2, tmp, out=d2)
        cdf = torch.cumsum(torch.mul(pw, d2, out=tmp), dim=1, out=buf)
        if bool((cdf[:, -1] <= 0).any()):
            cdf = torch.where(cdf[:, -1:] > 0, cdf, cdf_w)
    return torch.sort(centroids, dim=1).values


def _reseed_empty(xs, ws, c, empty) -> torch.Tensor:
    """Move every empty cluster of c [G, k] onto its group's worst-served points, worst first."""
    sorted_c = torch.sort(c, dim=1).values
    served = sorted_c.gather(1, nearest(xs, sorted_c))  # [G, n]
    err = torch.where(ws > 0, ws * (torch.where(ws > 0, xs, 0.0) - served) ** 2, 0.0)  # invalid: 0
    n_empty = int(empty.sum(dim=1).max())
    top = err.topk(min(n_empty, err.shape[1]), dim=1).indices  # [G, n_empty]
    rank = (empty.long().cumsum(dim=1) - 1).clamp(0, top.shape[1] - 1)  # [G, k]
    candidates = xs.gather(1, top.gather(1, rank))
    return torch.where(empty, candidates, c)
