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
from .float_stream import FloatStream
from .float_targets import CrossAccumulator
from .hessian import HessianAccumulator
from .linears import is_compressible, linear_shape


def collect_hessians(
    block: nn.Module, index: int, names: list[str], batches: list[BlockInput], stop_early: bool = True,
    ranks: Ranks = SINGLE, total: int | None = None, park_dir: Path | None = None,
    floats: FloatStream | None = None, crosses: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Run every batch through `block` (block number `index`, whose captured arguments it is
    called with), accumulating H of each named linear's input. One partial H per batch, summed
    along the fixed tree of `distributed.reduce_batches` (`batches`: this rank's share of `total`).

    With `stop_early` the forward is cut as soon as every named linear has seen its input: the
    rest of the block cannot change these Hessians, and skipping it makes staged solving cheap
    (the q/k/v stage costs one norm, the o stage stops before o_proj, …). Only safe when each
    linear runs once per forward, which the declared families guarantee.

    floats (`--targets float`): the float model's inputs of (some of) the named linears per batch;
    the cross term D (`float_targets.CrossAccumulator`) of each linear whose inputs it holds is then
    summed along the same tree and put into `crosses` by name.
    """
    linears = {name: block.get_submodule(name) for name in names}
    pending: set[str] = set()
    current: dict = {}  # name → HessianAccumulator, (name, CROSS) → CrossAccumulator
    at = [0]  # the batch being run

    def blank():
        return {key: _blank_for(linears[_name_of(key)], key) for key in _keys(names, floats)}

    def grab(name, x):
        if name not in current:  # made here, not before the forward: an 8192-wide H is 268 MB, not
            current[name] = _blank_for(linears[name])  # to be resident beside the forward's temporaries
        current[name].add(x)
        if floats is not None and floats.holds(name):
            if (name, CROSS) not in current:
                current[(name, CROSS)] = _blank_for(linears[name], (name, CROSS))
            current[(name, CROSS)].add_pair(x, floats.input_of(at[0], name))
        pending.discard(name)
        if stop_early and not pending:
            raise StopForward

    def leaves():
        for at[0], batch in enumerate(batches):
            current.clear()
            pending.update(names)
            try:
                run_block(block, batch, index)
            except StopForward:
                pass
            yield {key: current.get(key) or _blank_for(linears[_name_of(key)], key) for key in _keys(names, floats)}

    handles = [m.register_forward_pre_hook(lambda m, inp, name=name: grab(name, inp[0])) for name, m in linears.items()]
    try:
        summed = reduce_hessians(ranks, leaves(), len(batches) if total is None else total, blank, park_dir)
    finally:
        for h in handles:
            h.remove()
    if crosses is not None:
        crosses.update({key[0]: acc.take_hessian() for key, acc in summed.items() if isinstance(key, tuple)})
    return {key: acc.take_hessian() for key, acc in summed.items() if not isinstance(key, tuple)}


CROSS = "cross"  # the second half of a cross term's key: (linear name, CROSS)


def _keys(names: list[str], floats) -> list:
    return list(names) + [(name, CROSS) for name in names if floats is not None and floats.holds(name)]


def _name_of(key) -> str:
    return key[0] if isinstance(key, tuple) else key


def _blank_for(linear: nn.Module, key=None) -> HessianAccumulator:
    kind = CrossAccumulator if isinstance(key, tuple) else HessianAccumulator
    return kind(linear_shape(linear)[1], linear.weight.device)


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
                    total: int | None = None, floats=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[in, in] float32 H of the lm_head's input, norm(last block's output), over `batches` (this
    rank's share of `total`), and its cross term D with the float model's (`floats`: its last
    hidden states per batch, or None: no D)."""
    def blank():
        accs = {"head": HessianAccumulator(head.in_features, device)}
        if floats is not None:
            accs["cross"] = CrossAccumulator(head.in_features, device)
        return accs

    def leaves():
        for i, batch in enumerate(batches):
            leaf = blank()
            x = norm(batch.hidden)
            leaf["head"].add(x)
            if floats is not None:
                leaf["cross"].add_pair(x, norm(floats[i].hidden))
            yield leaf

    summed = reduce_hessians(ranks, leaves(), len(batches) if total is None else total, blank)
    cross = summed["cross"].take_hessian() if floats is not None else None
    return summed["head"].take_hessian(), cross
