"""Float32 compute with float16 storage for the linears of the block being compressed.

A float16 block moved to float32 doubles its largest share of memory (a 3072 × 8192 MLP matrix is
100 MB in float32) for values float16 holds exactly. Its plain `nn.Linear`s keep their float16
weight instead and upcast it for the length of one call: the forward computes on the same float32
values, so its outputs are the same bits. The compressed values put back are float16 numbers too
(`CompressedWeight.dequantize`), so the weights stay float16 through the whole block.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dtypes import COMPUTE_DTYPE


class Float32Linear(nn.Linear):
    """An nn.Linear whose weight may be stored narrower than the float32 it computes in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(COMPUTE_DTYPE), self.bias)


def upcast_per_call(block: nn.Module) -> list[nn.Linear]:
    """Turn `block`'s plain nn.Linears into Float32Linears (in place, hooks kept); returns them."""
    linears = [m for m in block.modules() if type(m) is nn.Linear]
    for m in linears:
        m.__class__ = Float32Linear
    return linears


def restore_linears(linears: list[nn.Linear]) -> None:
    for m in linears:
        m.__class__ = nn.Linear
