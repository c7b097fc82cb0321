"""`--magr` (MagR, Zhang et al., NeurIPS 2024): shrink each layer's weight range before it is quantized,
without changing what the layer computes on the calibration data.

Per layer, with H the layer's Hessian (Σ xᵀx over the calibration inputs, scaled so that its largest
eigenvalue is 1) and W its target (its weight, or the float target of `--targets float`):

    Ŵ = argmin ½ tr((V − W) H (V − W)ᵀ) + α Σ_g ‖V_g‖_∞

over V, g running over the rows of W (per-channel grids) or each row's blocks of `block_size` inputs
(per-block grids): the largest magnitude of every group the grid will scale is penalised, the
outputs on the calibration inputs are kept. The solver (GPTQ, SparseGPT with a grid) then quantizes
Ŵ on the same H. Proximal gradient descent with step 1 (= 1 / λ_max): V ← prox(V − (V − W) H), where
the prox of t‖·‖_∞ is v − P(v), P the Euclidean projection onto the ℓ1 ball of radius t (Moreau).
α: MagR's 0.001 per channel and 0.0001 per block; iterations: its 200 and 150.
"""

from __future__ import annotations

import torch

ALPHA_PER_CHANNEL = 1e-3
ALPHA_PER_BLOCK = 1e-4
ITERATIONS_PER_CHANNEL = 200
ITERATIONS_PER_BLOCK = 150


def project_onto_l1_ball(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row of v [rows, n] projected onto {u : ‖u‖₁ ≤ radius} (Duchi et al., ICML 2008): rows
    inside stay; the others become sign(v)·max(|v| − θ, 0), θ from the sorted magnitudes."""
    magnitude = v.abs()
    ordered = magnitude.sort(dim=1, descending=True).values
    excess = ordered.cumsum(dim=1) - radius  # Σ_{j≤k} μ_j − radius
    k = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    count = ((ordered * k > excess) * k).amax(dim=1).clamp(min=1)  # ρ: how many magnitudes stay positive
    theta = excess.gather(1, (count.long() - 1)[:, None]) / count[:, None]
    projected = v.sign() * (magnitude - theta).clamp(min=0)
    return torch.where(magnitude.sum(dim=1, keepdim=True) <= radius, v, projected)


def prox_linf(v: torch.Tensor, t: float, steps: int = 64) -> torch.Tensor:
    """argmin_u ½‖u − v‖² + t‖u‖_∞ for every row of v [rows, n]: v − P(v) (Moreau), i.e. v clipped at
    the magnitude θ where Σ (|v| − θ)₊ = t, or zero where ‖v‖₁ ≤ t. θ by Newton's method on that
    piecewise-linear equation from θ₀ = max|v| − t ≤ θ (exact after as many steps as magnitudes
    above θ, a few for a small t): no sort, which made `project_onto_l1_ball` the cost of MagR."""
    magnitude = v.abs()
    theta = magnitude.amax(dim=1, keepdim=True) - t
    for _ in range(steps):
        above = (magnitude - theta).clamp(min=0)
        excess = above.sum(dim=1, keepdim=True) - t
        count = (magnitude > theta).sum(dim=1, keepdim=True)
        step = excess / count.clamp(min=1)
        theta = theta + step
        if not bool((step > 1e-7 * theta.abs()).any()):
            break
    inside = magnitude.sum(dim=1, keepdim=True) <= t
    return torch.where(inside, torch.zeros_like(v), v.sign() * torch.minimum(magnitude, theta))


def applies_to(config) -> bool:
    """MagR shrinks the range an integer grid scales: methods with a Hessian and such a grid (GPTQ,
    SparseGPT with bits). LUTs (SKM) place their own levels."""
    return bool(config.needs_hessian and getattr(config, "bits", None) is not None
                and getattr(config, "n_bits", None) is None)


def reduce_magnitude(weight: torch.Tensor, hessian: torch.Tensor, block_size: int | None = None,
                     alpha: float | None = None, iterations: int | None = None) -> torch.Tensor:
    """Ŵ for `weight` [out, in] on `hessian` [in, in] (neither modified), float32: the magnitude of
    every row (block_size None) or every block of `block_size` inputs of a row, reduced at the cost
    α of the output error. alpha / iterations: None for MagR's per-channel or per-block values."""
    return reduce_magnitudes([weight], hessian, block_size, alpha, iterations)[0]


def reduce_magnitudes(weights: list[torch.Tensor], hessian: torch.Tensor, block_size: int | None = None,
                      alpha: float | None = None, iterations: int | None = None) -> list[torch.Tensor]:
    """`reduce_magnitude` of each of the layers sharing one input, with H scaled once for all."""
    H = hessian.to(torch.float32)
    largest = float(torch.linalg.eigvalsh(H.double()).max())
    if not largest > 0:  # no input ever reached the layer: nothing to keep, nothing to shrink against
        return [w.to(torch.float32).clone() for w in weights]
    H = H / largest
    return [_descend(w.to(torch.float32), H, block_size, alpha, iterations) for w in weights]


def _descend(W: torch.Tensor, H: torch.Tensor, block_size, alpha, iterations) -> torch.Tensor:
    """The proximal gradient iterations on H scaled to λ_max 1."""
    per_block = block_size is not None and block_size < W.shape[1]
    alpha = alpha if alpha is not None else (ALPHA_PER_BLOCK if per_block else ALPHA_PER_CHANNEL)
    iterations = iterations if iterations is not None else (ITERATIONS_PER_BLOCK if per_block else ITERATIONS_PER_CHANNEL)
    out, inp = W.shape
    group = block_size if per_block else inp
    padded = -(-inp // group) * group  # a last partial block: zeros neither count in ‖·‖_∞ nor move
    V = W.clone()
    for _ in range(iterations):
        step = torch.nn.functional.pad(V - (V - W) @ H, (0, padded - inp))
        V = prox_linf(step.reshape(-1, group), alpha).reshape(out, padded)[:, :inp]
    return V.contiguous()
