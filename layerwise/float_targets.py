"""`--targets float` (GPTAQ-style asymmetric calibration): fit the float model's outputs.

A layer sees X̃ (its inputs in the partially compressed model) where the float model saw X. The
objective ||W X − Ŵ X̃||² splits exactly into ||(W* − Ŵ) X̃||² + const with the least-squares fit
W* = W (X X̃ᵀ)(X̃ X̃ᵀ)⁻¹ of the float outputs on the compressed inputs, so every Hessian-weighted
solver (GPTQ, SparseGPT, SKM) solves W* on H̃ = X̃ X̃ᵀ unchanged.

In the row-major notation of `hessian.py` (x: [tokens, in]) W* = W + W D H̃⁻¹ with the cross
term D = 2/N Σ (x_float − x̃)ᵀ x̃ (= C − H̃ for C = 2/N Σ x_floatᵀ x̃): the difference is
accumulated directly, so D is exactly zero where both streams agree (block 0's first stage: W* = W
bit for bit) and carries no cancellation of two large sums. H̃ is damped as the solvers damp it
(dead columns' H_ii = 1, then `damp` · mean(diag H) on the diagonal); the damping then acts as the
ridge term λ|W − Ŵ|², which keeps W* = W wherever X = X̃.

The exact W* can overfit the calibration windows: it moves SmolLM2-135M's weights by 10–30 %
(|W* − W| / |W|), more than 3-bit rounding does. GPTAQ weights its correction by α = 0.25; the
target here is W + α (W* − W) with α = 0.4 by default (`--float-alpha`): on SmolLM2-135M it left
less perplexity damage than 0.15, 0.25 and 1 at 2- and 3-bit blocks of 32 and 4-bit per channel
(benchmarks/RESULTS.md).

Which groups: `--targets float` fits every group but a block's widest input (an MLP's down_proj,
`fitted_leaders`): its cross term is a full [in, in] product per token at the intermediate width,
the largest single cost of the float targets (on SmolLM2-135M 70 % of the cross products), and its
float input the largest the stream holds; leaving it on its own weights cost little on SmolLM2-135M
(RESULTS). `--targets float-all` fits every group.
"""

from __future__ import annotations

import torch

from .errors import NumericalError, RecipeError
from .hessian import HessianAccumulator, prepare_hessian, sums_stay_finite
from .linears import linear_shape

TARGETS = ("compressed", "float", "float-all")  # --targets: what a layer's compressed outputs are fitted to
DEFAULT_DAMP = 0.01  # for a method whose config has no `damp`
DEFAULT_ALPHA = 0.4  # the fraction of the step from W to W* taken (GPTAQ's α is 0.25; 1: the exact fit)


class CrossAccumulator(HessianAccumulator):
    """D = 2/N · Σ (x_float − x̃)ᵀ x̃ over N input rows, kept as the sum and N like the Hessian (the
    same fixed-tree reductions, parking and broadcasts apply: `distributed.reduce_hessians`).
    Not symmetric: the whole [in, in] product is computed and nothing is mirrored."""

    def add(self, x: torch.Tensor) -> None:
        raise TypeError("CrossAccumulator takes pairs: add_pair(x_compressed, x_float)")

    def add_pair(self, x: torch.Tensor, x_float: torch.Tensor) -> None:
        """x: [..., in] the linear's input in the compressed model; x_float: the same rows in the float model."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        diff = x_float.detach().reshape(-1, x.shape[-1]).to(device=x.device, dtype=torch.float32) - x
        self.sum.addmm_(diff.t(), x)
        self.rows += x.shape[0]
        if not sums_stay_finite(self.sum):  # x itself is checked by the Hessian's accumulator
            raise NumericalError("non-finite activations in the float model's stream reached a linear layer; "
                                 "the float model produces NaN/Inf on the calibration text")

    def _hessian_in_(self, full: torch.Tensor) -> torch.Tensor:
        if self.rows:
            full.mul_(2.0 / self.rows)
        return full


def float_targets(weights: list[torch.Tensor], hessian: torch.Tensor, cross: torch.Tensor,
                  damp: float = DEFAULT_DAMP, alpha: float = 1.0) -> tuple[list[torch.Tensor], list[float], list[str]]:
    """The targets W + α (W* − W) = W + α W D H_d⁻¹ of layers sharing one input (weights: [out_k, in]
    each, hessian H̃ and cross D: [in, in] float32, neither modified) as float32 [out_k, in]; how far each
    moved (|W* − W| / |W|); and notes (a retried factorization). H_d⁻¹ is factored in float64 (on the
    CPU for an MPS device, which has no float64); the products with it run in float32 on H̃'s device,
    which holds the correction to ~1e-6 of its size (float64 products took a twentieth of a
    `--targets float` run on a CPU)."""
    work = torch.device("cpu") if hessian.device.type == "mps" else hessian.device
    # the solvers' damping and retries (`hessian.prepare_hessian`), in float64: H_d⁻¹ = Uᵀ U
    prepared = prepare_hessian(hessian.to(device=work, dtype=torch.float64), damp)
    notes = [f"float targets: {note}" for note in prepared.notes]
    factor = prepared.cholesky_of_inverse.to(device=hessian.device, dtype=torch.float32)
    del prepared
    stacked = torch.cat([w.detach().to(device=hessian.device, dtype=torch.float32) for w in weights])  # [Σ out, in]
    if stacked.shape[0] > stacked.shape[1]:  # (D H_d⁻¹) first: [in, in] products, then one [Σ out, in] one
        corrections = stacked @ ((cross @ factor.t()) @ factor)
    else:  # three [Σ out, in] products (a wide input, e.g. down_proj's)
        corrections = ((stacked @ cross) @ factor.t()) @ factor
    corrections.mul_(alpha)  # α W D H_d⁻¹
    rows = [w.shape[0] for w in weights]
    out, moved = [], []
    for w, correction in zip(stacked.split(rows), corrections.split(rows)):
        norm = float(w.norm())
        moved.append(float(correction.norm()) / norm if norm > 0 else 0.0)
        out.append(w + correction)
    return out, moved, notes


def is_float(targets: str) -> bool:
    """Whether --targets `targets` fits the float model's outputs (on some groups)."""
    return targets != "compressed"


def fitted_leaders(block, leaders: list[str], every: bool) -> list[str]:
    """The group leaders (of `block`) whose groups are fitted to float targets: all with `every`
    (float-all), else all but the leader whose input is wider than every other leader's (an MLP's
    down_proj; a block whose widest input is shared keeps them all)."""
    widths = {name: linear_shape(block.get_submodule(name))[1] for name in leaders}
    ordered = sorted(widths.values())
    if every or len(ordered) < 2 or ordered[-1] == ordered[-2]:
        return list(leaders)
    return [name for name in leaders if widths[name] < ordered[-1]]


def check_targets(targets) -> None:
    if targets not in TARGETS:
        raise RecipeError(f"--targets {targets!r} is unknown; use one of {', '.join(TARGETS)}")


def check_alpha(alpha, targets: str) -> None:
    """--float-alpha: None (the default), or a fraction in (0, 1] with --targets float."""
    if alpha is None:
        return
    if not is_float(targets):
        raise RecipeError(f"--float-alpha {alpha!r} weighs the float targets' correction; it needs --targets float")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise RecipeError(f"--float-alpha {alpha!r} must be a fraction in (0, 1], e.g. {DEFAULT_ALPHA} (1: the exact fit)")


def damp_of(config) -> float:
    """The damping the config's solver uses (its `damp` field), else DEFAULT_DAMP."""
    return float(getattr(config, "damp", DEFAULT_DAMP))
