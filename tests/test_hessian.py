import pytest
import torch

from layerwise.errors import NumericalError
from layerwise.hessian import HessianAccumulator, prepare_hessian, relative_error


def test_streaming_hessian_equals_batch_formula():
    x = torch.randn(1000, 16, dtype=torch.float64).float()
    acc = HessianAccumulator(16)
    for chunk in x.split(137):
        acc.add(chunk)
    assert torch.allclose(acc.hessian, 2 / 1000 * x.T @ x, rtol=1e-5, atol=1e-6)
    assert acc.rows == 1000


def test_nan_activations_are_an_error():
    acc = HessianAccumulator(4)
    with pytest.raises(NumericalError, match="non-finite"):
        acc.add(torch.tensor([[1.0, float("nan"), 0, 0]]))


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
def test_in_place_factorization_is_bit_identical_to_the_plain_formula(act_order):
    """prepare_hessian factors in one buffer (column-major view, tiles); the result must be the
    bits of the out-of-place LAPACK calls on the lower triangle, for a Hessian that is not exactly
    symmetric (streamed sums are not), wider than one tile, with a dead column."""
    torch.manual_seed(0)
    n = 1100  # two full 512-row tiles and a partial one
    x = torch.randn(n + 50, n)
    x[:, 3] = 0
    hessian = x.t() @ x + 1e-3 * torch.randn(n, n).triu(1)  # the upper triangle differs from the lower
    perm = torch.randperm(n) if act_order else None
    got = prepare_hessian(hessian, 0.01, perm=perm)

    H = hessian[perm][:, perm] if act_order else hessian.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    eye = torch.arange(n)
    H[eye, eye] = H[eye, eye].clone() + 0.01 * torch.mean(torch.diag(H)).item()
    lower = torch.linalg.cholesky(H)  # reads the lower triangle only
    expected = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    assert torch.equal(got.cholesky_of_inverse, expected)
    assert torch.equal(got.cholesky_of_inverse, got.cholesky_of_inverse.triu())
