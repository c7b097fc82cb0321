"""Hessian math shared by every solver: streaming XᵀX, damping, dead columns, the Cholesky factor of H⁻¹."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .errors import NumericalError

log = logging.getLogger(__name__)


class HessianAccumulator:
    """`H = 2/N · Σ xᵀx` over N input rows, kept as the plain sum Σ xᵀx and N until asked for.

    x: [..., in] activations of one linear layer; H: [in, in] float32. Sums (not a running mean)
    so that partial Hessians of fixed window shards can be added in a fixed order (`merge`): the
    same additions on one rank or many give the same bits (`layerwise.distributed`).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if not torch.isfinite(x).all():
            raise NumericalError(
                "non-finite activations reached a linear layer; the model produces NaN/Inf on the "
                "calibration text (try float32 weights, or check the checkpoint)"
            )
        self.sum.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """Add `other`'s rows into this one (in place); returns self."""
        self.sum.add_(other.sum)
        self.rows += other.rows
        return self

    @property
    def hessian(self) -> torch.Tensor:
        """2/N · Σ xᵀx: [in, in] float32 (a new tensor)."""
        return self.sum * (2.0 / self.rows) if self.rows else self.sum.clone()


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """Relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ); weight, approx: [out, in].

    hessian None: H = I, the weight-space |ΔW|² / |W|² (data-free methods, no inputs seen)."""
    w = weight.to(torch.float32)
    delta = approx.to(torch.float32) - w
    # products in place: one [out, in] temporary fewer each, the same values
    num = ((delta * delta) if hessian is None else (delta @ hessian).mul_(delta)).sum()
    den = ((w * w) if hessian is None else (w @ hessian).mul_(w)).sum()
    return float(num / den) if den > 0 else float(num)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): proportional to the layer's summed squared output error on the calibration data."""
    delta = approx.to(torch.float32) - weight.to(torch.float32)
    return float(((delta @ hessian) * delta).sum())


def dead_columns(hessian: torch.Tensor) -> torch.Tensor:
    """bool [in]: inputs that were zero on every calibration row (H_ii = 0). Their weights cannot
    change the layer's output; the solvers set them to zero."""
    return torch.diagonal(hessian) == 0


@dataclass
class PreparedHessian:
    """What an OBS sweep (solvers/sweep.py) needs: the upper Cholesky factor of H⁻¹ and bookkeeping."""

    cholesky_of_inverse: torch.Tensor  # [in, in] upper-triangular U with H⁻¹ = Uᵀ U (not the inverse of a factor of H)
    dead: torch.Tensor  # bool [in], in sweep order (after `perm`): columns that never saw a non-zero input
    damping: float  # fraction of mean(diag H) finally added to the diagonal
    notes: list[str] = field(default_factory=list)
    damped: torch.Tensor | None = None  # [in, in] the H that was factored (only with keep_damped=True)


def prepare_hessian(
    hessian: torch.Tensor,
    damp: float = 0.01,
    max_damp: float = 10.0,
    perm: torch.Tensor | None = None,
    keep_damped: bool = False,
) -> PreparedHessian:
    """Dead columns get H_ii = 1, damping `damp · mean(diag H)` is added, and H⁻¹ is factored.

    A failed Cholesky retries with ten times the damping, up to `max_damp`; each retry is noted.
    `perm` (optional) reorders the columns first (act-order). The input is not modified.
    `keep_damped` also returns the factored H (an extra [in, in] copy, only for solvers that use it).
    """
    if not _all_finite(hessian):
        raise NumericalError(
            "the Hessian holds NaN/Inf: the calibration activations overflowed even in float32; check the "
            "model's weights (`layerwise ppl MODEL` shows whether the model itself produces NaN)"
        )
    dead = dead_columns(hessian)
    if perm is not None:
        dead = dead[perm]

    def undamped() -> torch.Tensor:
        """A fresh [in, in] copy in sweep order, dead columns with H_ii = 1."""
        H = _permuted(hessian, perm) if perm is not None else hessian.clone()
        H[dead, dead] = 1.0
        return H

    H = undamped()
    mean_diag = torch.mean(torch.diag(H)).item()
    notes: list[str] = []
    fraction = damp
    eye = torch.arange(H.shape[0], device=H.device)
    diag = H[eye, eye].clone()
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    while True:
        # Damped and factored in place: the clone of H per attempt and L, H⁻¹, U alive together
        # were the peak of a whole compress run (6.8 × [in, in]). LAPACK works on column-major
        # matrices, and torch gives a row-major `out=` a column-major temporary (one more [in, in]
        # per call): the calls below get the column-major view U.mT instead, which needs U exactly
        # symmetric (its lower triangle is what was factored before) and leaves the factor
        # transposed, turned back tile by tile. Same LAPACK calls on the same values: same bits.
        H[eye, eye] = diag + fraction * mean_diag
        U = H.clone() if keep_damped else H
        _mirror_lower(U)
        A = U.mT
        try:
            torch.linalg.cholesky_ex(A, out=(A, info))  # L, lower
            if info.item() != 0:
                raise RuntimeError("not positive definite")
            torch.cholesky_inverse(A, out=A)  # H⁻¹
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))  # U with H⁻¹ = UᵀU (U holds it transposed)
            if info.item() != 0 or not _all_finite(U):
                raise RuntimeError("inverse not positive definite")
        except RuntimeError:
            retry = fraction * 10 if fraction > 0 else 0.01  # ten times no damping is still none
            if retry > max_damp:
                raise NumericalError(
                    f"Cholesky of the Hessian failed even at damping {fraction:g}; the layer's "
                    "inputs are degenerate (use more or more varied calibration text)"
                ) from None
            note = f"Cholesky failed at damping {fraction:g}, retried at {retry:g}"
            log.warning(note)
            notes.append(note)
            fraction = retry
            if not keep_damped:
                H = undamped()  # the failed factorization overwrote it
            continue
        _transpose_in_place(U)
        return PreparedHessian(U, dead, fraction, notes, damped=H if keep_damped else None)


_TILE = 512  # rows per temporary in the in-place copies below (512 × in floats, not [in, in])


def _permuted(hessian: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """hessian[perm][:, perm] with one [in, in] allocation (the columns permuted a tile of rows at a time)."""
    H = hessian.index_select(0, perm)
    for i in range(0, H.shape[0], _TILE):
        H[i : i + _TILE] = H[i : i + _TILE].index_select(1, perm)
    return H


def _all_finite(H: torch.Tensor) -> bool:
    """torch.isfinite(H).all() a tile of rows at a time: on the whole matrix it makes an abs() copy
    and boolean masks, +1.7 × [in, in] at once."""
    return all(bool(torch.isfinite(H[i : i + _TILE]).all()) for i in range(0, H.shape[0], _TILE))


def _tiles(n: int):
    """(rows, columns) slice pairs of the tiles on and above the diagonal of an [n, n] matrix."""
    for i in range(0, n, _TILE):
        for j in range(i, n, _TILE):
            yield slice(i, i + _TILE), slice(j, j + _TILE)


def _mirror_lower(H: torch.Tensor) -> None:
    """Copy H's lower triangle onto its upper one, in place (bit copies: H becomes exactly symmetric)."""
    for rows, cols in _tiles(H.shape[0]):
        if rows == cols:
            tile = H[rows, cols]
            above = torch.ones_like(tile, dtype=torch.bool).triu(1)
            tile.copy_(torch.where(above, tile.t(), tile))
        else:
            H[rows, cols] = H[cols, rows].t()


def _transpose_in_place(H: torch.Tensor) -> None:
    """H ← Hᵀ for a square H, a tile at a time."""
    for rows, cols in _tiles(H.shape[0]):
        upper = H[rows, cols].clone()
        H[rows, cols] = H[cols, rows].t() if rows != cols else upper.t()
        H[cols, rows] = upper.t()
