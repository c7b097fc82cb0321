"""The Hessians of one block's linears: H = 2/N Σ xᵀx of each named linear's input over the
calibration batches, and which linears share an input (one Hessian per group).

Every function runs the block on batches whose captured arguments it is called with
(`capture.run_block`); the partial Hessians are summed along `distributed.reduce_hessians`'s fixed
tree, so 1, 2 or 4 ranks give the same bits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .capture import BlockInput, StopForward, run_block
from .distributed import SINGLE, Ranks, reduce_hessians
from .hessian import HessianAccumulator
from .linears import is_compressible, linear_shape


def collect_hessians(
    block: nn.Module, index: int, names: list[str], batches: list[BlockInput], stop_early: bool = True,
    ranks: Ranks = SINGLE, total: int | None = None, park_dir: Path | None = None,
) -> dict[str, torch.Tensor]:
    """Run every batch through `block` (block number `index`, whose captured arguments it is
    called with), accumulating H of each named linear's input. One partial H per batch, summed
    along the fixed tree of `distributed.reduce_batches` (`batches`: this rank's share of `total`).

    With `stop_early` the forward is cut as soon as every named linear has seen its input: the
    rest of the block cannot change these Hessians, and skipping it makes staged solving cheap
    (the q/k/v stage costs one norm, the o stage stops before o_proj, …). Only safe when each
    linear runs once per forward, which the declared families guarantee.
    """
    linears = {name: block.get_submodule(name) for name in names}
    pending: set[str] = set()
    current: dict[str, HessianAccumulator] = {}

    def blank():
        return {name: _blank_for(m) for name, m in linears.items()}

    def grab(name, x):
        if name not in current:  # made here, not before the forward: an 8192-wide H is 268 MB, not
            current[name] = _blank_for(linears[name])  # to be resident beside the forward's temporaries
        current[name].add(x)
        pending.discard(name)
        if stop_early and not pending:
            raise StopForward

    def leaves():
        for batch in batches:
            current.clear()
            pending.update(names)
            try:
                run_block(block, batch, index)
            except StopForward:
                pass
            yield {name: current.get(name) or _blank_for(m) for name, m in linears.items()}

    handles = [m.register_forward_pre_hook(lambda m, inp, name=name: grab(name, inp[0])) for name, m in linears.items()]
    try:
        summed = reduce_hessians(ranks, leaves(), len(batches) if total is None else total, blank, park_dir)
    finally:
        for h in handles:
            h.remove()
    return {name: acc.take_hessian() for name, acc in summed.items()}


def _blank_for(linear: nn.Module) -> HessianAccumulator:
    return HessianAccumulator(linear_shape(linear)[1], linear.weight.device)


def discover_groups(block: nn.Module, index: int, batch: BlockInput) -> tuple[tuple[str, ...], ...]:
    """Linears grouped by the input tensor they share, in execution order (generic fallback)."""
    seen: dict[tuple, list[str]] = {}
    handles = []
    for name, module in block.named_modules():
        if is_compressible(module):
            def hook(m, inp, out, name=name):
                x = inp[0]
                seen.setdefault((x.data_ptr(), tuple(x.shape)), []).append(name)
            handles.append(module.register_forward_hook(hook))
    try:
        run_block(block, batch, index)
    finally:
        for h in handles:
            h.remove()
    return tuple(tuple(names) for names in seen.values())


def lm_head_hessian(norm: nn.Module, head: nn.Module, batches, device: torch.device, ranks: Ranks = SINGLE,
                    total: int | None = None) -> torch.Tensor:
    """[in, in] float32 H of the lm_head's input, norm(last block's output), over `batches` (this
    rank's share of `total`)."""
    def blank():
        return {"head": HessianAccumulator(head.in_features, device)}

    def leaves():
        for batch in batches:
            leaf = blank()
            leaf["head"].add(norm(batch.hidden))
            yield leaf

    return reduce_hessians(ranks, leaves(), len(batches) if total is None else total, blank)["head"].take_hessian()
