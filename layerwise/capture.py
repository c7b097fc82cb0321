"""Catch what every block receives in the real model's forward: block 0's hidden states, and each
block's own arguments (attention mask, rotary cos/sin, position ids), for any Hugging Face decoder
whose blocks sit in one nn.ModuleList.

Blocks can differ: Gemma 2/3 alternate sliding-window and full attention (and Gemma 3 local and
global rope), so block 0's mask and rotary tables are wrong for the others. Each block's arguments
are recorded as the model hands them over; a tensor the model gives to several blocks (one mask per
attention kind) is stored once and shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import ModelError


@dataclass
class BlockCall:
    """The arguments one block is called with, after its hidden states."""

    args: tuple  # positional arguments after hidden (GPT-2 passes its mask positionally), caches → None
    kwargs: dict  # attention_mask (may be None), position_ids, position_embeddings=(cos, sin), …


@dataclass
class BlockInput:
    """One calibration batch as the blocks see it."""

    hidden: torch.Tensor  # [B, L, hidden] float32: the input of the block being processed
    calls: list[BlockCall]  # per block index; tensors shared between blocks given the same one


class StopForward(Exception):
    """Raised from a hook to cut a forward once what it was run for has been seen."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int, device: torch.device
) -> list[BlockInput]:
    """Run the model on `windows` [N, L] with every block replaced by a recorder, batch by batch.

    Only the modules outside the blocks run (embeddings, rotary, mask construction): a recorder
    keeps its block's arguments and passes the hidden states through, so the blocks' weights are
    never read (they may be on the meta device), and the forward stops at the last block.
    """
    captured: list[BlockInput] = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        captured.append(_capture_batch(model, blocks, ids, device))
    return captured


def _capture_batch(model, blocks, ids, device) -> BlockInput:
    calls: list[BlockCall | None] = [None] * len(blocks)
    first_hidden = []
    moved: dict[int, tuple] = {}  # id(model's tensor) → (that tensor, our copy): one copy per shared tensor

    def recorder(index):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            rest = tuple(None if _is_cache(a) else a for a in args[1:])
            calls[index] = BlockCall(_to(rest, device, moved), _to(kwargs, device, moved))
            if index == 0:
                first_hidden.append(hidden.to(device=device, dtype=torch.float32))
            if index == len(blocks) - 1:
                raise StopForward
            return hidden

        return forward

    saved = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's hooks live there
    for index, block in enumerate(blocks):
        block.forward = recorder(index)  # an instance attribute shadows the class's forward
    try:
        model(input_ids=ids, use_cache=False)
    except StopForward:
        pass
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise ModelError(f"the model's forward never called blocks {missing[:4]} of its block list; "
                         "layerwise needs every block called once per forward, in order")
    return BlockInput(first_hidden[0], calls)


def run_block(block: nn.Module, batch: BlockInput, index: int) -> torch.Tensor:
    """Block `index`'s output hidden states [B, L, hidden] (decoder layers return a tensor or a tuple)."""
    call = batch.calls[index]
    out = block(batch.hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _is_cache(obj) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(obj, Cache)


def _to(obj, device, moved: dict):
    if isinstance(obj, torch.Tensor):
        if id(obj) not in moved:
            copy = obj.to(device=device, dtype=torch.float32) if obj.is_floating_point() else obj.to(device)
            moved[id(obj)] = (obj, copy)  # keeping `obj` alive keeps its id unique during the forward
        return moved[id(obj)][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, moved) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, moved) for k, v in obj.items()}
    return obj
