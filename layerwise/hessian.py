"""Hessian math shared by every solver: streaming XᵀX, damping, dead columns, the Cholesky factor of H⁻¹."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import NumericalError

log = logging.getLogger(__name__)


class HessianAccumulator:
    """`H = 2/N · Σ xᵀx` over N input rows, kept as the plain sum Σ xᵀx and N until asked for.

    x: [..., in] activations of one linear layer; H: [in, in] float32. Sums (not a running mean)
    so that partial Hessians of fixed window shards can be added in a fixed order (`merge`): the
    same additions on one rank or many give the same bits (`layerwise.distributed`).

    H is symmetric, so only its upper block triangle is computed: row panels of `PANEL` inputs,
    panel i holding xᵢᵀ x[:, panel i onwards] (about 60 % of the full product's work for the wide
    inputs of an MLP); `hessian` mirrors the upper triangle into the lower one.
    """

    PANEL = 256  # inputs per row panel: wide enough for efficient matmuls

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        n = x.shape[1]
        for lo in range(0, n, self.PANEL):
            hi = min(lo + self.PANEL, n)
            self.sum[lo:hi, lo:].addmm_(x[:, lo:hi].t(), x[:, lo:])
        self.rows += x.shape[0]
        if not sums_stay_finite(self.sum):
            raise NumericalError(
                "non-finite activations reached a linear layer; the model produces NaN/Inf on the "
                "calibration text (try float32 weights, or check the checkpoint)"
            )

    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """Add `other`'s rows into this one (in place); returns self."""
        self.sum.add_(other.sum)
        self.rows += other.rows
        return self

    @property
    def hessian(self) -> torch.Tensor:
        """2/N · Σ xᵀx: [in, in] float32 (a new tensor), exactly symmetric."""
        return self._hessian_in_(self.sum.clone())

    def _hessian_in_(self, full: torch.Tensor) -> torch.Tensor:
        """`full` (the sum, or a copy of it) made into H in place: scaled by 2/N, and the computed
        upper triangle mirrored onto the lower one."""
        if self.rows:
            full.mul_(2.0 / self.rows)
        _mirror_lower(full.mT)
        return full

    def park(self, directory: Path) -> "ParkedHessian":
        """The sum moved to a file in `directory` (its memory freed) until `ParkedHessian.add_into`."""
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, suffix=".hessian")
        with os.fdopen(fd, "wb") as f:
            self.sum.cpu().numpy().tofile(f)
        parked = ParkedHessian(Path(name), tuple(self.sum.shape), self.rows)
        self.sum = None
        return parked

    def take_hessian(self) -> torch.Tensor:
        """`hessian` (the same bits) made in the sum's own buffer, for a caller done with this
        accumulator: no second [in, in] beside the sum. The accumulator is spent afterwards."""
        full, self.sum = self.sum, None
        return self._hessian_in_(full)


@dataclass
class ParkedHessian:
    """A `HessianAccumulator`'s sum waiting in a file (`HessianAccumulator.park`)."""

    path: Path
    shape: tuple[int, int]
    rows: int

    def add_into(self, acc: HessianAccumulator) -> HessianAccumulator:
        """acc with this sum added, read back a tile of rows at a time (no second [in, in]); the file
        is removed. The same bits as `parked.merge(acc)`: acc + parked is parked + acc, element by
        element (floating-point addition commutes)."""
        tile = torch.empty(_TILE, self.shape[1], dtype=torch.float32)
        with open(self.path, "rb") as f:
            for i in range(0, self.shape[0], _TILE):
                part = tile[: min(_TILE, self.shape[0] - i)]
                f.readinto(memoryview(part.numpy()).cast("B"))
                acc.sum[i : i + part.shape[0]].add_(part.to(acc.sum.device))
        self.path.unlink()
        acc.rows += self.rows
        return acc


REPORT_ROWS = 512  # output rows a layer's error report reads at most (evenly spaced beyond that)


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """Relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ); weight, approx: [out, in].

    hessian None: H = I, the weight-space |ΔW|² / |W|² (data-free methods, no inputs seen).
    Layers with more than REPORT_ROWS output rows are measured on REPORT_ROWS evenly spaced rows:
    the exact figure costs more than the layer's whole solve on wide MLPs, and a report needs
    no more than two or three digits."""
    rows = report_rows(weight.shape[0])
    w = weight[rows].to(torch.float32)
    delta = approx[rows].to(torch.float32) - w
    if hessian is None:
        num, den = (delta * delta).sum(), (w * w).sum()
    else:
        num, den = quadratic_forms(torch.stack([delta, w]), hessian)
    return float(num / den) if den > 0 else float(num)


def report_denominator(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H Wᵀ) on the rows `relative_error` reads (its denominator)."""
    w = weight[report_rows(weight.shape[0])].to(torch.float32)
    return float(quadratic_forms(w[None], hessian)[0])


def relative_error_of_rows(row_errors: torch.Tensor, denominator: float) -> float:
    """`relative_error` from a solver's per-row (ΔW H ΔWᵀ)ⱼⱼ (Solution.row_errors) and
    `report_denominator`, on the same rows; a sum that rounding left below zero counts as zero."""
    num = max(float(row_errors[report_rows(row_errors.shape[0])].sum()), 0.0)
    return num / denominator if denominator > 0 else num


def report_rows(out_features: int) -> slice | torch.Tensor:
    """The rows `relative_error` reads: all of them, or REPORT_ROWS evenly spaced ones."""
    if out_features <= REPORT_ROWS:
        return slice(None)
    return torch.linspace(0, out_features - 1, REPORT_ROWS).round().long()


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): proportional to the layer's summed squared output error on the calibration data."""
    delta = approx.to(torch.float32) - weight.to(torch.float32)
    return float(quadratic_forms(delta[None], hessian)[0])


def quadratic_forms(a: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """[k] tr(Aⱼ H Aⱼᵀ) of a: [k, rows, in] with a symmetric H: [in, in].

    Only H's upper block triangle is read (row panels as in `HessianAccumulator`): the diagonal
    blocks count once and the blocks above them twice, about 60 % of the full product's work."""
    flat = a.reshape(-1, a.shape[-1])
    n, panel = flat.shape[1], HessianAccumulator.PANEL
    total = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    for lo in range(0, n, panel):
        hi = min(lo + panel, n)
        part = (flat[:, lo:hi] @ hessian[lo:hi, lo:]).reshape(a.shape[0], a.shape[1], n - lo)
        total += (part[..., : hi - lo] * a[..., lo:hi]).sum(dim=(1, 2))
        total += 2 * (part[..., hi - lo :] * a[..., hi:]).sum(dim=(1, 2))
    return total


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
    added: float = 0.0  # damping · mean(diag H): what was finally added to every diagonal entry


def prepare_hessian(
    hessian: torch.Tensor,
    damp: float = 0.01,
    max_damp: float = 10.0,
    perm: torch.Tensor | None = None,
    keep_damped: bool = False,
    in_place: bool = False,
) -> PreparedHessian:
    """Dead columns get H_ii = 1, damping `damp · mean(diag H)` is added, and H⁻¹ is factored.

    A failed Cholesky retries with ten times the damping, up to `max_damp`; each retry is noted.
    `perm` (optional) reorders the columns first (act-order). The input is not modified, unless
    `in_place`: then U is built in the caller's buffer (contiguous, [in, in]), which is consumed
    (for a caller that owns H and needs it no more: one [in, in] less at the solve).
    `keep_damped` also returns the factored H (an extra [in, in] copy, only for solvers that use it).

    U comes from one Cholesky and one triangular inverse (`_cholesky_of_inverse_`), in place in
    one [in, in] buffer: the textbook route (Cholesky, inverse from it, Cholesky again) does twice
    the arithmetic, and its buffers were once the memory peak of a whole compress run.
    """
    _check_input(hessian, in_place, keep_damped)
    dead = dead_columns(hessian)
    order = perm if perm is not None else torch.arange(hessian.shape[0], device=hessian.device)
    dead = dead[order]
    reverse = order.flip(0)
    gone = dead.flip(0)

    def undamped_reversed() -> torch.Tensor:
        """H in reversed sweep order (J H J), dead columns with H_ii = 1: a fresh [in, in] copy, or
        (in_place) the caller's buffer reordered."""
        if in_place:
            H = _reorder_in_place_(hessian, None if perm is None else reverse)
        else:  # (flip: half the time of the gather)
            H = hessian.flip(0, 1) if perm is None else hessian[reverse[:, None], reverse[None, :]]
        H[gone, gone] = 1.0
        return H

    H = undamped_reversed()
    undamped = _LowerTriangle(H) if in_place else None  # kept for retries: the caller's H is gone

    def restore(H: torch.Tensor) -> torch.Tensor:
        if in_place:
            undamped.restore(H)
            return H
        return undamped_reversed()

    return _factor_with_retries(H, restore, dead, damp, max_damp, keep_damped)


def _check_input(hessian: torch.Tensor, in_place: bool, keep_damped: bool) -> None:
    if not _all_finite(hessian):
        raise NumericalError(
            "the Hessian holds NaN/Inf: the calibration activations overflowed even in float32; check the "
            "model's weights (`layerwise ppl MODEL` shows whether the model itself produces NaN)"
        )
    if in_place and (keep_damped or not hessian.is_contiguous()):
        raise ValueError("prepare_hessian(in_place=True) needs a contiguous hessian and no keep_damped")


def _factor_with_retries(H, restore, dead, damp, max_damp, keep_damped) -> PreparedHessian:
    """Add `damp` · mean(diag H) to the diagonal of H (undamped, reversed sweep order, [in, in]) and
    factor it in place; a failed Cholesky overwrote H, so `restore(H)` gives the undamped H back and
    the factoring is retried with ten times the damping, up to `max_damp`."""
    mean_diag = torch.mean(torch.diag(H)).item()
    notes: list[str] = []
    fraction = damp
    eye = torch.arange(H.shape[0], device=H.device)
    diag = H[eye, eye].clone()
    while True:
        H[eye, eye] = diag + fraction * mean_diag
        damped = H.clone() if keep_damped else None
        if _cholesky_of_inverse_(H):
            if damped is not None:
                _rotate_half_turn_(damped)  # back to sweep order
            return PreparedHessian(H, dead, fraction, notes, damped=damped, added=fraction * mean_diag)
        retry = fraction * 10 if fraction > 0 else 0.01  # ten times no damping is still none
        if retry > max_damp:
            raise NumericalError(
                f"Cholesky of the Hessian failed even at damping {fraction:g}; the layer's "
                "inputs are degenerate (use more or more varied calibration text)"
            )
        note = f"Cholesky failed at damping {fraction:g}, retried at {retry:g}"
        log.warning(note)
        notes.append(note)
        fraction = retry
        H = restore(H)


_TILE = 512  # rows per temporary in the in-place copies below (512 × in floats, not [in, in])


def sums_stay_finite(total: torch.Tensor) -> bool:
    """Whether every product summed into `total` ([in, in], Σ aᵀ x) was finite, read off its diagonal
    alone: a NaN or ±Inf in column i of either factor makes Σ a_i x_i NaN or ±Inf (Inf · 0 is NaN), and
    so does a square past float32's range. O(in) per batch, where checking the activations
    themselves cost a tenth of a calibration run."""
    return bool(torch.isfinite(total.diagonal()).all())


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


def _reorder_in_place_(H: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """H[order][:, order] in H's own buffer (bit copies); order None: the reversal J H J.
    Rows are moved along the permutation's cycles (one row of temporary), then columns the same
    way between two in-place transposes, so no second [in, in] buffer is made."""
    if order is None:
        _rotate_half_turn_(H)
        return H
    for _ in range(2):
        _permute_rows_(H, order.tolist())
        _transpose_in_place(H)
    return H


def _permute_rows_(H: torch.Tensor, order: list[int]) -> None:
    """H[i] ← H[order[i]] for every row, in place, one cycle of the permutation at a time."""
    done = bytearray(len(order))
    for start in range(len(order)):
        if done[start]:
            continue
        saved = H[start].clone()
        i = start
        while True:
            done[i] = 1
            source = order[i]
            if source == start:
                H[i] = saved
                break
            H[i] = H[source]
            i = source


class _LowerTriangle:
    """A copy of H's lower triangle (row panels, about half of H), to put H back after a failed
    in-place Cholesky: torch's Cholesky zeroes the triangle it does not factor, LAPACK overwrites
    the other, so nothing of H is left in its buffer."""

    def __init__(self, H: torch.Tensor):
        self.panels = [H[i : i + _TILE, : i + _TILE].clone() for i in range(0, H.shape[0], _TILE)]

    def restore(self, H: torch.Tensor) -> None:
        """The lower triangle back into H: all `_cholesky_of_inverse_` reads (it mirrors it first)."""
        for k, panel in enumerate(self.panels):
            H[k * _TILE : (k + 1) * _TILE, : (k + 1) * _TILE] = panel


def _transpose_in_place(H: torch.Tensor) -> None:
    """H ← Hᵀ for a square H, a tile at a time."""
    for rows, cols in _tiles(H.shape[0]):
        upper = H[rows, cols].clone()
        H[rows, cols] = H[cols, rows].t() if rows != cols else upper.t()
        H[cols, rows] = upper.t()


def _cholesky_of_inverse_(M: torch.Tensor) -> bool:
    """M = J H J (H in reversed order) → in place U, upper, with H⁻¹ = UᵀU; False if H is not
    positive definite (M is then garbage).

    J H J = L Lᵀ (L lower) gives H = R Rᵀ with R = J L J upper, so H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ =
    J L⁻¹ J: one Cholesky (n³/3) and one triangular inverse (n³/3) where Cholesky, inverse and
    Cholesky again cost 4n³/3. LAPACK works on column-major matrices and torch gives a row-major
    `out=` a column-major temporary, so the work runs on the column-major view M.mT (M made exactly
    symmetric first: its lower triangle is what is factored) and is transposed back at the end."""
    _mirror_lower(M)
    A = M.mT
    info = torch.zeros((), dtype=torch.int32, device=M.device)
    torch.linalg.cholesky_ex(A, out=(A, info))
    if info.item() != 0:
        return False
    _invert_lower_(A)  # (cholesky_ex has zeroed A's upper triangle)
    _rotate_half_turn_(M)  # A = J L⁻¹ J = U
    _transpose_in_place(M)
    return _all_finite(M)


INVERSE_LEAF = 128  # below this size a triangular inverse is one solve_triangular


def _invert_lower_(L: torch.Tensor) -> None:
    """L (lower triangular, zeros above) → L⁻¹ in place, by halves: [[A, 0], [B, C]]⁻¹ =
    [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]. The new B comes from two triangular solves against A and C
    before they are inverted (n³/6 multiply-adds in all, LAPACK trtri's count; products with the
    inverted halves would do twice that), a tile at a time so no temporary is larger than _TILE × n."""
    n = L.shape[0]
    if n <= INVERSE_LEAF:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return
    h = n // 2
    A, B, C = L[:h, :h], L[h:, :h], L[h:, h:]
    for i in range(0, n - h, _TILE):  # B ← B A⁻¹, rows at a time
        B[i : i + _TILE] = torch.linalg.solve_triangular(A, B[i : i + _TILE], upper=False, left=False)
    for j in range(0, h, _TILE):  # B ← −C⁻¹ B, columns at a time
        B[:, j : j + _TILE] = torch.linalg.solve_triangular(C, B[:, j : j + _TILE], upper=False).neg_()
    _invert_lower_(A)
    _invert_lower_(C)


def _rotate_half_turn_(M: torch.Tensor, chunk: int = 1 << 20) -> None:
    """M[i, j] ← M[n−1−i, m−1−j] in place (J M J): the flat buffer reversed, swapping chunks from
    both ends so no second [in, in] buffer is needed."""
    flat = M.view(-1)
    total = flat.numel()
    for lo in range(0, total // 2, chunk):
        hi = min(lo + chunk, total // 2)
        head = flat[lo:hi].clone()
        flat[lo:hi] = flat[total - hi : total - lo].flip(0)
        flat[total - hi : total - lo] = head.flip(0)
