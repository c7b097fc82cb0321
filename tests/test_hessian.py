import pytest
import torch

from layerwise.errors import NumericalError
from layerwise.hessian import HessianAccumulator, output_error, prepare_hessian, relative_error


def test_streaming_hessian_equals_batch_formula():
    x = torch.randn(1000, 16, dtype=torch.float64).float()
    acc = HessianAccumulator(16)
    for chunk in x.split(137):
        acc.add(chunk)
    assert torch.allclose(acc.hessian, 2 / 1000 * x.T @ x, rtol=1e-5, atol=1e-6)
    assert acc.rows == 1000


def test_panelled_hessian_is_symmetric_and_equals_the_full_product():
    # wider than one panel (and not a multiple of it): only the upper block triangle is computed
    width = 2 * HessianAccumulator.PANEL + 37
    x = torch.randn(300, width, dtype=torch.float64)
    acc = HessianAccumulator(width)
    for chunk in x.float().split(120):
        acc.add(chunk)
    H = acc.hessian
    assert torch.equal(H, H.T)
    assert torch.allclose(H.double(), 2 / 300 * x.T @ x, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(torch.tril(acc.sum, diagonal=-HessianAccumulator.PANEL)) == 0  # never computed


def test_nan_activations_are_an_error():
    acc = HessianAccumulator(4)
    with pytest.raises(NumericalError, match="non-finite"):
        acc.add(torch.tensor([[1.0, float("nan"), 0, 0]]))


def test_infinite_activations_past_the_first_tile_are_an_error():
    x = torch.ones(1500, 4)  # the check runs a tile of rows at a time: the bad row is in the third
    x[1300, 2] = float("-inf")
    with pytest.raises(NumericalError, match="non-finite"):
        HessianAccumulator(4).add(x)


def test_dead_columns_and_inverse_factor():
    x = torch.randn(200, 8)
    x[:, 3] = 0
    H = 2 / 200 * x.T @ x
    prep = prepare_hessian(H, damp=0.01)
    assert prep.dead.tolist() == [i == 3 for i in range(8)]
    Hd = H.clone()
    Hd[3, 3] = 1
    Hd += 0.01 * torch.diag(Hd).mean() * torch.eye(8)
    U = prep.cholesky_of_inverse
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), atol=1e-4)


def test_cholesky_failure_retries_with_more_damping_and_says_so():
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    eig = torch.tensor([8.0, 1, 1, 1, 1, 1, 1, -0.2], dtype=torch.float64)  # one negative eigenvalue
    H = (q @ torch.diag(eig) @ q.T).float()
    prep = prepare_hessian(H, damp=0.01)
    assert prep.damping == pytest.approx(1.0)  # 0.01 and 0.1 fail, 1.0 lifts the -0.2 eigenvalue
    assert prep.notes == ["Cholesky failed at damping 0.01, retried at 0.1", "Cholesky failed at damping 0.1, retried at 1"]


def test_zero_damping_retries_from_the_default_fraction():
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    eig = torch.tensor([8.0, 1, 1, 1, 1, 1, 1, -0.2], dtype=torch.float64)
    H = (q @ torch.diag(eig) @ q.T).float()
    prep = prepare_hessian(H, damp=0.0)  # ten times zero would stay zero: the retry starts at 0.01
    assert prep.damping == pytest.approx(1.0)
    assert prep.notes[0] == "Cholesky failed at damping 0, retried at 0.01"


def test_nan_hessian_is_an_error():
    with pytest.raises(NumericalError, match="NaN"):
        prepare_hessian(torch.full((3, 3), float("nan")))


def test_relative_error_zero_for_exact():
    w = torch.randn(4, 6)
    H = torch.eye(6)
    assert relative_error(w, w, H) == 0
    assert relative_error(w, torch.zeros_like(w), H) == pytest.approx(1.0)


@pytest.mark.parametrize("act_order", [False, True])
def test_in_place_factorization_of_a_wide_unsymmetric_hessian(act_order):
    """prepare_hessian factors in one buffer (column-major view, tiles, a blocked inverse): for a
    Hessian that is not exactly symmetric (streamed sums need not be), wider than one tile, with a
    dead column, the answer is the one for the symmetric matrix with the same lower triangle (in
    sweep order), and the textbook factor of it."""
    torch.manual_seed(0)
    n = 1100  # two full 512-row tiles and a partial one
    x = torch.randn(n + 50, n)
    x[:, 3] = 0
    hessian = x.t() @ x + 1e-3 * torch.randn(n, n).triu(1)  # the upper triangle differs from the lower
    perm = torch.randperm(n) if act_order else None
    got = prepare_hessian(hessian, 0.01, perm=perm).cholesky_of_inverse
    assert torch.equal(got, got.triu())

    H = hessian[perm][:, perm] if act_order else hessian.clone()
    rev = torch.arange(n - 1, -1, -1)
    R = H[rev][:, rev]
    R = R.tril() + R.tril(-1).t()  # the triangle that is factored, made symmetric
    symmetric = R[rev][:, rev]
    same = prepare_hessian(symmetric[torch.argsort(perm)][:, torch.argsort(perm)] if act_order else symmetric,
                           0.01, perm=perm).cholesky_of_inverse
    assert torch.equal(got, same)
    Hd = symmetric.double()
    dead = torch.diagonal(Hd) == 0
    Hd[dead, dead] = 1.0
    Hd += 0.01 * torch.diag(Hd).mean() * torch.eye(n, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert torch.allclose(got.double(), reference, rtol=1e-2, atol=1e-3 * reference.abs().max())


def test_relative_and_output_error_equal_the_trace_formulas():
    width = 2 * HessianAccumulator.PANEL + 11  # three panels
    x = torch.randn(700, width, dtype=torch.float64)
    H = (2 / 700 * x.T @ x)
    w, q = torch.randn(40, width, dtype=torch.float64), torch.randn(40, width, dtype=torch.float64)
    delta = q - w
    num, den = torch.trace(delta @ H @ delta.T), torch.trace(w @ H @ w.T)
    assert relative_error(w.float(), q.float(), H.float()) == pytest.approx(float(num / den), rel=1e-4)
    assert output_error(w.float(), q.float(), H.float()) == pytest.approx(float(num), rel=1e-4)
    assert relative_error(w.float(), q.float(), None) == pytest.approx(float((delta**2).sum() / (w**2).sum()), rel=1e-5)


def test_wide_layers_report_their_error_from_evenly_spaced_rows():
    from layerwise.hessian import REPORT_ROWS, report_rows

    x = torch.randn(400, 64)
    H = 2 / 400 * x.T @ x
    w = torch.randn(4 * REPORT_ROWS, 64)
    q = w + 0.1 * torch.randn_like(w)
    rows = report_rows(w.shape[0])
    assert len(rows) == REPORT_ROWS and rows[0] == 0 and rows[-1] == w.shape[0] - 1
    exact = torch.trace((q - w) @ H @ (q - w).T) / torch.trace(w @ H @ w.T)
    assert relative_error(w, q, H) == pytest.approx(float(exact), rel=0.1)  # an estimate on a quarter of the rows
    assert relative_error(w[:REPORT_ROWS], q[:REPORT_ROWS], H) == pytest.approx(
        float(torch.trace((q - w)[:REPORT_ROWS] @ H @ (q - w)[:REPORT_ROWS].T) / torch.trace(w[:REPORT_ROWS] @ H @ w[:REPORT_ROWS].T)),
        rel=1e-4)


@pytest.mark.parametrize("width", [5, 300])  # one leaf; several levels of the blocked inverse
def test_inverse_factor_equals_the_textbook_route(width):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * width, width, generator=g, dtype=torch.float64)
    x[:, 1] = 0  # a dead column
    H = (2 / (2 * width) * x.T @ x).float()
    perm = torch.randperm(width, generator=g)
    prep = prepare_hessian(H, damp=0.05, perm=perm, keep_damped=True)
    Hd = H[perm][:, perm].double()
    d = prep.dead.nonzero().flatten()
    Hd[d, d] = 1.0
    Hd += 0.05 * torch.diag(Hd).mean() * torch.eye(width, dtype=torch.float64)
    assert torch.equal(prep.damped, Hd.float())  # the factored H, in sweep order
    reference = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    U = prep.cholesky_of_inverse
    assert torch.equal(U, torch.triu(U))
    assert torch.allclose(U.double(), reference, rtol=1e-3, atol=1e-4 * reference.abs().max())


def _indefinite(width: int, seed: int = 0) -> torch.Tensor:
    """A symmetric H whose least eigenvalue is −5 % of its mean diagonal (after the shift):
    damping 0.01 fails, 0.1 succeeds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * width, width, generator=g, dtype=torch.float64)
    S = x.T @ x / (2 * width)
    low = torch.linalg.eigvalsh(S)[0]
    shift = low + 0.05 * (torch.diag(S).mean() - low) / 1.05
    return (S - shift * torch.eye(width, dtype=torch.float64)).float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("case", ["unsymmetric", "retries"])
def test_in_place_preparation_equals_the_copy(act_order, case):
    """prepare_hessian(in_place=True) builds U in the caller's buffer — reordered there by bit
    copies, and after a failed Cholesky put back from the copy of its lower triangle — and gives
    the same bits (U, notes, damping) as the default, which leaves its input alone."""
    torch.manual_seed(1)
    n = 1100  # two full 512-row tiles and a partial one
    if case == "unsymmetric":
        x = torch.randn(n + 50, n)
        x[:, 3] = 0  # a dead column
        hessian = x.t() @ x + 1e-3 * torch.randn(n, n).triu(1)
    else:
        hessian = _indefinite(n)
    perm = torch.randperm(n) if act_order else None
    original = hessian.clone()
    kept = prepare_hessian(hessian, 0.01, perm=perm)
    assert torch.equal(hessian, original)
    consumed = prepare_hessian(hessian, 0.01, perm=perm, in_place=True)
    assert consumed.cholesky_of_inverse.data_ptr() == hessian.data_ptr()  # no second [in, in]
    assert torch.equal(consumed.cholesky_of_inverse, kept.cholesky_of_inverse)
    assert torch.equal(consumed.dead, kept.dead)
    assert (consumed.damping, consumed.notes, consumed.added) == (kept.damping, kept.notes, kept.added)
    if case == "retries":
        assert consumed.notes == ["Cholesky failed at damping 0.01, retried at 0.1"]
