"""Settings of the uniform-grid methods (GPTQ and its data-free bar, RTN)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import (MethodConfig, check_bits, check_block_size, check_damp, check_flag, check_grid_fields, check_int,
                   require)
from .grid import GRIDS

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
    # the lattice of the scales (`grid.scale_significand`): "mlx" / "gguf" make those outputs decode
    # to this checkpoint's weights bit for bit; "float16" (any float16 scale) is the default
    grid: str = "float16"

    def __post_init__(self):
        check_bits(self.bits, QUANT_BITS)
        check_grid_fields(self.sym, self.mse_clip, self.block_size)
        require(self.grid in GRIDS, f"grid={self.grid!r} is unknown; use one of {list(GRIDS)}")

    def to_dict(self) -> dict:
        raw = super().to_dict()
        if raw["grid"] == "float16":  # the default is left out: checkpoints made before it keep their bytes
            del raw["grid"]
        return raw

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
        check_flag(self.act_order, "act_order")
        check_damp(self.damp)
        check_int(self.lazy_batch, "lazy_batch", hint=", e.g. 128")

    def hessian_preparation(self):
        return (self.damp, self.act_order)
