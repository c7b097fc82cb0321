"""Settings of the palettization methods: plain k-means and sensitive k-means (SKM).

Field names follow coremltools' `OpPalettizerConfig` (n_bits, granularity, group_size, lut_dtype,
cluster_dim) so a coremltools recipe reads the same here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig, check_bits, check_damp, check_flag, check_fraction, check_int, divisors_hint, is_number, require

PALETTE_BITS = (1, 2, 3, 4, 6, 8)  # the index widths iOS18's constexpr_lut_to_dense holds
GRANULARITIES = ("per_tensor", "per_grouped_channel")
LUT_DTYPES = ("float16", "int8", "uint8")
SENSITIVITIES = ("hessian_diag", "fisher")


@dataclass
class KMeansConfig(MethodConfig):
    """Plain k-means palettization: one LUT of 2**n_bits float16 entries per group of output
    channels, every weight replaced by its nearest entry. Data-free."""

    method = "kmeans"
    needs_hessian = False
    n_bits: int = 4
    granularity: str = "per_tensor"  # one LUT for the layer, or one per `group_size` output channels
    group_size: int = 32  # output channels per LUT (per_grouped_channel only)
    lut_dtype: str = "float16"  # "int8" / "uint8": LUT stored as codes × one float16 scale per LUT
    cluster_dim: int = 1  # 1 = scalar palettization (vector palettization is not implemented)
    seed: int = 0  # k-means++ initialisation
    max_iters: int = 30  # Lloyd iterations
    tol: float = 1e-4  # stop once no centroid moves more than tol × (value range of its group)

    def __post_init__(self):
        check_bits(self.n_bits, PALETTE_BITS, key="n_bits")
        require(
            self.granularity in GRANULARITIES,
            f"granularity={self.granularity!r} is not supported; use one of {list(GRANULARITIES)}",
        )
        check_int(self.group_size, "group_size", hint=" (output channels per LUT)")
        require(
            self.lut_dtype in LUT_DTYPES,
            f"lut_dtype={self.lut_dtype!r} is not supported; use one of {list(LUT_DTYPES)}",
        )
        require(
            self.cluster_dim == 1,
            f"cluster_dim={self.cluster_dim!r} is not supported: only scalar palettization "
            "(cluster_dim: 1) is implemented",
        )
        check_int(self.seed, "seed", minimum=0)
        check_int(self.max_iters, "max_iters", minimum=0)
        require(is_number(self.tol) and self.tol >= 0, f"tol={self.tol!r} must be a non-negative number, e.g. 1e-4")

    def group_out(self, out_features: int) -> int:
        """Output channels sharing one LUT."""
        return out_features if self.granularity == "per_tensor" else self.group_size

    def check_shape(self, out_features, in_features, name):
        if self.granularity == "per_grouped_channel":
            require(
                out_features % self.group_size == 0,
                f"group_size={self.group_size} does not divide the {out_features} output features "
                f"(out_features) of {name}; use a divisor of {out_features} ({divisors_hint(out_features)}) or "
                "granularity: per_tensor",
            )


@dataclass
class SKMConfig(KMeansConfig):
    """Sensitive k-means (SKM): k-means weighted by each weight's sensitivity (H_jj by default),
    then a GPTQ-style sweep that snaps column after column to its group's LUT and pushes the error
    onto the columns not yet snapped through the inverse Hessian."""

    method = "skm"
    needs_hessian = True
    error_feedback: bool = True  # GPTQ-style column sweep against the fitted LUT
    refit_lut: bool = False  # after the sweep, refit each LUT entry to its assigned weights
    sensitivity: str = "hessian_diag"  # "fisher": per-weight sensitivity passed by the caller
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    lazy_batch: int = 128  # columns per lazy batch update
    sparsity: float | None = None  # fraction of weights pruned (joint sparse + palettized)

    def __post_init__(self):
        super().__post_init__()
        check_flag(self.error_feedback, "error_feedback")
        check_flag(self.refit_lut, "refit_lut")
        require(
            self.sensitivity in SENSITIVITIES,
            f"sensitivity={self.sensitivity!r} is not supported; use one of {list(SENSITIVITIES)}",
        )
        check_damp(self.damp)
        check_int(self.lazy_batch, "lazy_batch", hint=", e.g. 128")
        if self.sparsity is not None:
            check_fraction(self.sparsity, "sparsity", "e.g. 0.5, or omitted")

    def hessian_preparation(self):
        return (self.damp, False) if self.error_feedback else None
