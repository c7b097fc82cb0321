"""Settings of the uniform-grid methods (GPTQ and its data-free bar, RTN)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig, check_bits, check_block_size, check_grid_fields, require

QUANT_BITS = range(2, 9)


@dataclass
class RTNConfig(MethodConfig):
    """Round-to-nearest on the same grid as GPTQ: data-free."""

    method = "rtn"
    needs_hessian = False
    bits: int = 4
    block_size: int | None = None  # input columns per scale; None = per output channel
    sym: bool = False
    mse_clip: bool = True  # shrink each block's range to minimise |q(w) - w|^2.4 (off: plain min-max)

    def __post_init__(self):
        check_bits(self.bits, QUANT_BITS)
        check_grid_fields(self.sym, self.mse_clip, self.block_size)

    def check_shape(self, out_features, in_features, name):
        check_block_size(self.block_size, in_features, name)


@dataclass
class GPTQConfig(RTNConfig):
    """GPTQ: columns quantized one at a time, the error pushed onto later columns through H⁻¹."""

    method = "gptq"
    needs_hessian = True
    act_order: bool = True  # visit columns by decreasing H_ii (static groups: blocks stay contiguous)
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    lazy_batch: int = 128  # columns per lazy batch update

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.act_order, bool), f"act_order={self.act_order!r} must be true or false")
        require(
            isinstance(self.damp, (int, float)) and 0 < self.damp < 10,
            f"damp={self.damp!r} must be a fraction of mean(diag H) in (0, 10), e.g. 0.01",
        )
        require(
            isinstance(self.lazy_batch, int) and self.lazy_batch > 0,
            f"lazy_batch={self.lazy_batch!r} must be a positive integer",
        )
