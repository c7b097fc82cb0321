"""Settings of the palettization methods: plain k-means and sensitive k-means (SKM).

Field names follow coremltools' `OpPalettizerConfig` (n_bits, granularity, group_size, lut_dtype,
cluster_dim) so a coremltools recipe reads the same here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig, check_bits, require

PALETTE_BITS = (1, 2, 3, 4, 6, 8)  # the index widths iOS18's constexpr_lut_to_dense holds
GRANULARITIES = ("per_tensor", "per_grouped_channel")
LUT_DTYPES = ("float16", "int8", "uint8")
SENSITIVITIES = ("hessian_diag", "fisher")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        require(
            _is_int(self.group_size) and self.group_size > 0,
            f"group_size={self.group_size!r} must be a positive integer (output channels per LUT)",
        )
        require(
            self.lut_dtype in LUT_DTYPES,
            f"lut_dtype={self.lut_dtype!r} is not supported; use one of {list(LUT_DTYPES)}",
        )
        require(
            self.cluster_dim == 1,
            f"cluster_dim={self.cluster_dim!r} is not supported: only scalar palettization "
            "(cluster_dim: 1) is implemented",
        )
        require(
            _is_int(self.seed) and self.seed >= 0,
            f"seed={self.seed!r} must be a non-negative integer",
        )
        require(
            _is_int(self.max_iters) and self.max_iters >= 0,
            f"max_iters={self.max_iters!r} must be a non-negative integer",
        )
        require(
            _is_number(self.tol) and self.tol >= 0,
            f"tol={self.tol!r} must be a non-negative number, e.g. 1e-4",
        )

    def group_out(self, out_features: int) -> int:
        """Output channels sharing one LUT."""
        return out_features if self.granularity == "per_tensor" else self.group_size

    def check_shape(self, out_features, in_features, name):
        if self.granularity == "per_grouped_channel":
            require(
                out_features % self.group_size == 0,
                f"group_size={self.group_size} does not divide the {out_features} output features "
                f"(out_features) of {name}; use a divisor of {out_features} (e.g. 8, 16, 32) or "
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
        require(
            isinstance(self.error_feedback, bool),
            f"error_feedback={self.error_feedback!r} must be true or false",
        )
        require(isinstance(self.refit_lut, bool), f"refit_lut={self.refit_lut!r} must be true or false")
        require(
            self.sensitivity in SENSITIVITIES,
            f"sensitivity={self.sensitivity!r} is not supported; use one of {list(SENSITIVITIES)}",
        )
        require(
            _is_number(self.damp) and 0 < self.damp < 10,
            f"damp={self.damp!r} must be a fraction of mean(diag H) in (0, 10), e.g. 0.01",
        )
        require(
            _is_int(self.lazy_batch) and self.lazy_batch > 0,
            f"lazy_batch={self.lazy_batch!r} must be a positive integer",
        )
        require(
            self.sparsity is None or (_is_number(self.sparsity) and 0 <= self.sparsity < 1),
            f"sparsity={self.sparsity!r} must be a fraction in [0, 1) (e.g. 0.5) or omitted",
        )
