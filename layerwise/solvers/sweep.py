"""The lazy-batch OBS sweep that GPTQ, SparseGPT and SKM's error feedback share.

Columns are visited in order; each is replaced by the value its solver's rule picks (a grid code, a
pruned zero, a LUT entry), and the error is pushed onto the columns not visited yet through the
upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): column i's error e_i = (w_i − q_i) / U_ii updates
w_j −= e_i · U_ij for j > i. Inside a lazy batch of columns that update is done column by column;
the columns after the batch get it once, as one matmul (Frantar et al.'s lazy batching).

Rows never interact: every step is row-wise, so layers sharing one H can be swept as one stacked
matrix, as long as each rule's choices are row-wise too (see stacking.py).
"""

from __future__ import annotations

from typing import Protocol

import torch


class ColumnRule(Protocol):
    """What a solver supplies to the sweep: its per-column rounding and its block-start steps."""

    def start_batch(self, i1: int, batch: torch.Tensor, diag_u: torch.Tensor) -> None:
        """Called once per lazy batch before its first column. batch: [out, i2 − i1], the batch's
        error-updated columns; diag_u: [i2 − i1] the matching diagonal of U (saliency masks)."""

    def start_column(self, col: int, upcoming) -> None:
        """Called before column `col` is rounded; `upcoming(width)` returns the current values of
        columns col … col + width − 1 ([out, width], error-updated up to this column): grid fits
        and n:m masks use it."""

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor:
        """The float32 value column `col` (current values w: [out]) becomes."""


INNER = 16  # columns whose errors are pushed one by one; the rest of the lazy batch gets them as one product


def obs_sweep(W: torch.Tensor, U: torch.Tensor, rule: ColumnRule, lazy_batch: int,
              error_sq: torch.Tensor | None = None) -> None:
    """Sweep W: [out, in] float32 in place against U: [in, in] upper Cholesky factor of H⁻¹.

    Afterwards W holds, for every column, the value it had when it was rounded (the error-corrected
    target the rule snapped from, used by SKM's LUT refit).

    The sweep works on Wᵀ ([in, out], one contiguous row per column of W): every per-column step
    then reads and writes contiguous memory instead of one float per cache line, which is most of
    a column's cost on wide layers. Rules still see [out, …] views.
    Inside a lazy batch the errors are pushed column by column only onto the next INNER columns
    (a few hundred kB that stay in cache), and onto the batch's later columns once per INNER
    columns, as one product: the same updates as pushing each onto the whole batch, in a third
    of the time on wide layers, where every column's update used to stream the batch through memory.
    """
    WT = W.t().contiguous()
    obs_sweep_transposed(WT, U, rule, lazy_batch, error_sq)
    W.copy_(WT.t())


def obs_sweep_transposed(WT: torch.Tensor, U: torch.Tensor, rule: ColumnRule, lazy_batch: int,
                         error_sq: torch.Tensor | None = None) -> None:
    """`obs_sweep` on Wᵀ: [in, out] float32, contiguous, swept in place (for a solver that builds
    Wᵀ itself: no second [out, in] copy). error_sq (float64 [out], optional) gets Σᵢ eᵢ² of every
    row added: with H_d⁻¹ = UᵀU, W − Q = E U, so that sum is the row's (ΔW H_d ΔWᵀ)ⱼⱼ."""
    in_f = WT.shape[0]
    for i1 in range(0, in_f, lazy_batch):
        i2 = min(i1 + lazy_batch, in_f)
        batch = WT[i1:i2].clone()  # [b, out]
        errors = torch.empty_like(batch)
        U1 = U[i1:i2, i1:i2]
        diag = torch.diagonal(U1)
        rest = WT[i2:]
        rule.start_batch(i1, batch.t(), diag)
        for j1 in range(0, i2 - i1, INNER):
            j2 = min(j1 + INNER, i2 - i1)
            for i in range(j1, j2):
                rule.start_column(i1 + i, lambda width, i=i: upcoming_columns(batch, rest, i, width, errors[j1:i], U1[j1:i, j2:]))
                w = batch[i]
                err = torch.sub(w, rule.round(i1 + i, w), out=errors[i]).div_(diag[i])
                batch[i:j2].addr_(U1[i, i:j2], err, alpha=-1)
            batch[j2:].addmm_(U1[j1:j2, j2:].t(), errors[j1:j2], alpha=-1)
        # batch[i] now holds q_i; q_i + e_i·U_ii is the value column i had when it was rounded
        WT[i1:i2] = batch.addcmul_(errors, diag[:, None])
        rest.addmm_(U[i1:i2, i2:].t(), errors, alpha=-1)
        if error_sq is not None:
            error_sq += errors.square().sum(dim=0, dtype=torch.float64)


def upcoming_columns(batch, rest, i, width, pending_errors, pending_u) -> torch.Tensor:
    """The current values of the `width` columns starting at column i of a lazy batch, as [out, width].

    batch: [b, out] the batch being swept (one row per column); rest: [n, out] the columns after it
    (updated once per batch). The batch's columns past the current INNER block still lack the
    errors of that block's columns before i (pending_errors: [k, out], pending_u: their rows of U
    from the block's end on); they are added here. Only the needed columns are sliced, then joined.
    """
    head = batch[i : i + width]
    late = i + width - (batch.shape[0] - pending_u.shape[1])  # columns of head past the INNER block
    if late > 0 and pending_errors.shape[0]:
        head = head.clone()
        head[-late:] -= pending_u[:, :late].t() @ pending_errors
    if head.shape[0] < width:
        head = torch.cat([head, rest[: width - head.shape[0]]], dim=0)
    return head.t()
