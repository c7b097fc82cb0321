"""Catch what block 0 receives: hidden states and every keyword argument (rotary cos/sin, masks,
position ids), for any Hugging Face decoder whose blocks sit in one nn.ModuleList."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class BlockInput:
    """One calibration batch as a block sees it."""

    hidden: torch.Tensor  # [B, L, hidden] float32
    kwargs: dict  # attention_mask (may be None), position_ids, position_embeddings=(cos, sin), …


class StopForward(Exception):
    """Raised from a hook to cut a forward once what it was run for has been seen."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device
) -> list[BlockInput]:
    """Run the model on `windows` [N, L] up to `first_block` and keep its inputs, batch by batch.

    Only the modules before the first block run (embeddings, rotary); the blocks are never called.
    """
    captured: list[BlockInput] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append(BlockInput(hidden.to(torch.float32), _to(kwargs, device)))
        raise StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, batch: BlockInput) -> torch.Tensor:
    """The block's output hidden states [B, L, hidden] (decoder layers return a tensor or a tuple)."""
    out = block(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=torch.float32) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj
