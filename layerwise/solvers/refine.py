"""Masked least-squares refinement of a pruned layer: with the mask fixed, move the kept weights to
the minimiser of the layer's output error tr((W − W₀) H (W − W₀)ᵀ).

SparseGPT's sweep compensates each pruned column only on the columns after it, and columns pruned
later lose the compensation they received, so its kept weights are not the best ones for its own
final mask. Each row's optimum is a linear solve over its kept inputs (a different system per row);
preconditioned conjugate gradient runs all rows at once with one [out, in] × [in, in] matmul per
step, and from SparseGPT's answer a few tens of steps get most of the way (see the tests against
the exact per-row solve). Every step lowers the error, so stopping early is safe.
"""

from __future__ import annotations

import torch


def refine_masked(
    target: torch.Tensor, start: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, steps: int
) -> torch.Tensor:
    """target W₀, start W: [out, in] float32; keep: bool [out, in]; hessian: [in, in] positive definite.

    Returns W (float32, zero where ~keep) after `steps` Jacobi-preconditioned CG steps on
    min over W with W[~keep] = 0 of tr((W − W₀) H (W − W₀)ᵀ), each row solved independently.
    """
    kept = keep.to(start.dtype)
    W = start * kept
    inv_diag = 1.0 / torch.diag(hessian).clamp_min(torch.finfo(hessian.dtype).tiny)
    residual = -((W - target) @ hessian) * kept  # minus the gradient, on the kept entries
    z = residual * inv_diag
    direction = z.clone()
    rz = (residual * z).sum(1)
    for _ in range(steps):
        curvature_dir = (direction @ hessian) * kept
        curvature = (direction * curvature_dir).sum(1)
        # a converged row has direction 0 (curvature 0): its step stays 0 instead of 0/0
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        W += alpha[:, None] * direction
        residual -= alpha[:, None] * curvature_dir
        z = residual * inv_diag
        rz_next = (residual * z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-30), torch.zeros_like(rz))
        direction = z + beta[:, None] * direction
        rz = rz_next
    return W
