"""Where the walker keeps tensors: a block on the compute device in float32 while it is worked on,
the tensors outside the blocks moved there and back, a compressed outside weight put back after a
lazy reader read it again (`dtypes.kept_dtype` is the storage policy)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .dtypes import COMPUTE_DTYPE, kept_dtype
from .formats import CompressedWeight
from .upcast import upcast_per_call


def put_outside(module: nn.Module, cw: CompressedWeight) -> None:
    """A compressed weight outside the blocks back into its module after the lazy reader read it again."""
    module.weight.data = cw.dequantize().to(kept_dtype(module.weight.dtype))


def onload(block: nn.Module, device: torch.device) -> tuple[torch.dtype, list[nn.Linear]]:
    """Move `block` to `device` for float32 compute; returns the dtype to keep it in afterwards
    (`dtypes.kept_dtype`) and its linears that compute in float32 from float16 storage (`upcast`),
    to hand to `restore_linears` once the block is done."""
    dtype = next(block.parameters()).dtype
    kept = kept_dtype(dtype)
    upcast = upcast_per_call(block) if kept == torch.float16 else []
    narrow = {id(m.weight) for m in upcast}
    block.to(device=device)
    for tensor in list(block.parameters()) + list(block.buffers()):
        if tensor.is_floating_point() and id(tensor) not in narrow:
            tensor.data = tensor.data.to(COMPUTE_DTYPE)
    return kept, upcast


def move_outside(
    model: nn.Module, skip: tuple[str, ...], device: torch.device, dtypes: dict[str, torch.dtype] | None = None
) -> dict[str, torch.dtype]:
    """Move every parameter and buffer whose name starts with none of `skip` (the blocks' prefix, …)
    to `device` (tied ones once), as float32, or back to the `dtypes` returned by the first call;
    returns the dtypes found."""
    found = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(skip):
            continue
        found[name] = tensor.dtype
        dtype = COMPUTE_DTYPE if tensor.is_floating_point() else tensor.dtype
        if dtypes is not None:
            dtype = kept_dtype(dtypes.get(name, dtype))
        tensor.data = tensor.data.to(device=device, dtype=dtype)
    return found
