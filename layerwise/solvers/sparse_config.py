"""Settings of the pruning methods (SparseGPT and its data-free bar, magnitude pruning).

Exactly one pattern: ``sparsity`` (unstructured fraction of zeros, exact per layer) or ``nm``
(``"2:4"`` = keep 2 of every 4 consecutive input weights). With ``bits`` the kept weights also
land on the uniform grid of `grid.py` (joint sparse + quantized); without, they stay float16.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError
from .base import (MethodConfig, check_bits, check_block_size, check_damp, check_fraction, check_grid_fields, check_int,
                   divisors_hint, is_int, require)
from .quant_config import QUANT_BITS


def parse_nm(nm) -> tuple[int, int]:
    """"2:4", [2, 4] or (2, 4) → (n kept, m group width); RecipeError otherwise."""
    hint = "use nm: '2:4' (keep n of every m consecutive input weights, n < m)"
    if is_int(nm):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124
        raise RecipeError(f"nm={nm!r} is a number; quote it in YAML: {hint}")
    parts = nm.split(":") if isinstance(nm, str) else nm if isinstance(nm, (list, tuple)) else None
    try:
        n, m = (_integer(p) for p in parts)
    except (TypeError, ValueError):
        raise RecipeError(f"nm={nm!r} is not an n:m pattern; {hint}") from None
    require(1 <= n < m, f"nm={nm!r} must keep 1 <= n < m weights of every m; {hint}")
    return n, m


def _integer(part) -> int:
    if isinstance(part, str):
        return int(part.strip())
    if is_int(part):
        return part
    raise TypeError(part)


@dataclass
class SparseConfig(MethodConfig):
    """Fields shared by SparseGPT and magnitude pruning."""

    sparsity: float | None = None  # fraction of zeros in [0, 1); the layer gets round(sparsity·numel)
    nm: tuple[int, int] | str | None = None  # n kept of every m consecutive inputs, e.g. "2:4"
    bits: int | None = None  # None: kept weights in float16; else joint sparse + affine grid
    block_size: int | None = None  # input columns per scale (joint only); None = per output channel
    sym: bool = False
    mse_clip: bool = False  # shrink each block's range to minimise |q(w) - w|^2.4 over kept weights

    def __post_init__(self):
        require(
            (self.sparsity is None) != (self.nm is None),
            "give exactly one of 'sparsity' (e.g. 0.5, unstructured) and 'nm' (e.g. '2:4')",
        )
        if self.sparsity is not None:
            check_fraction(self.sparsity, "sparsity", "the fraction of zeros, e.g. 0.5")
            self.sparsity = float(self.sparsity)

        if self.nm is not None:
            self.nm = parse_nm(self.nm)
        if self.bits is None:
            for key, default in (("block_size", None), ("sym", False), ("mse_clip", False)):
                require(
                    getattr(self, key) == default,
                    f"{key}={getattr(self, key)!r} only applies to joint sparse + quantized weights; "
                    "set bits (e.g. bits: 4) or drop it",
                )
        else:
            check_bits(self.bits, QUANT_BITS)
        check_grid_fields(self.sym, self.mse_clip, self.block_size)

    def check_shape(self, out_features, in_features, name):
        check_block_size(self.block_size, in_features, name)
        # float16 kept values + a 1-bit mask take (1 - s)·16 + 1 bits per weight: at s < 1/16 that is
        # more than the float16 layer itself (the solvers still accept it, e.g. to study compensation)
        require(
            self.bits is not None or self.sparsity is None or self.sparsity >= 1 / 16,
            f"sparsity={self.sparsity} keeps float16 values plus a 1-bit mask, {(1 - (self.sparsity or 0)) * 16 + 1:.2f} "
            f"bits per weight for {name}: larger than float16 (16); use sparsity >= 0.0625 or add bits",
        )
        if self.nm is not None:
            n, m = self.nm
            require(
                in_features % m == 0,
                f"nm={n}:{m} needs groups of {m} inputs, but {name} has {in_features} input "
                f"features; use an m that divides {in_features} ({divisors_hint(in_features, (2, 4, 8, 16))})",
            )


# Conjugate-gradient steps of the masked refinement: on SmolLM2-135M layers (16 windows) 8 steps
# reach 90-95 % of the output-error reduction of 32, 16 steps 99 %; each step is one W·H matmul,
# which on SmolLM2 made 32 steps 60 % of SparseGPT's whole compression time.
REFINE_STEPS = 12


@dataclass
class SparseGPTConfig(SparseConfig):
    """SparseGPT: mask chosen per column block by OBS saliency, error pushed onto later columns."""

    method = "sparsegpt"
    needs_hessian = True
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    column_block: int = 128  # columns per mask selection and lazy batch update
    # conjugate-gradient steps re-solving the kept float weights for the final mask (refine.py);
    # None: REFINE_STEPS for float kept weights, 0 for joint (refining would leave the grid)
    refine_steps: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.refine_steps is None:
            self.refine_steps = 0 if self.bits is not None else REFINE_STEPS
        check_int(self.refine_steps, "refine_steps", minimum=0, hint=f", e.g. {REFINE_STEPS} (0: off)")
        require(
            self.bits is None or self.refine_steps == 0,
            f"refine_steps={self.refine_steps} re-solves float kept weights, which would move joint "
            "weights off their quantization grid; drop refine_steps or bits",
        )
        check_damp(self.damp)
        check_int(self.column_block, "column_block", hint=", e.g. 128")
        if self.nm is not None:
            n, m = self.nm
            require(
                self.column_block % m == 0,
                f"column_block={self.column_block} must be a multiple of m={m} (nm={n}:{m}) so no "
                "n:m group straddles two column blocks",
            )


@dataclass
class MagnitudeConfig(SparseConfig):
    """Magnitude pruning: drop the smallest |w| (per row or per layer), data-free."""

    method = "magnitude"
    needs_hessian = False
    granularity: str = "row"  # "row": each row gets the same share of zeros; "layer": one threshold

    def __post_init__(self):
        super().__post_init__()
        require(
            self.granularity in ("layer", "row"),
            f"granularity={self.granularity!r} must be 'row' or 'layer'",
        )
