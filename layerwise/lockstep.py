"""Staged solving in ONE forward of the block: every calibration batch runs the block in its own
thread, all batches pause together at the input of each group of linears, the group is solved from
the complete Hessian, and every batch resumes with the compressed weights.

Each stage still sees the earlier stages' error (the staged semantics of block_hessians.collect_hessians,
stage by stage), but the block is run once instead of once per stage plus once more for the next
block's inputs: the forward that collected the last stage's Hessian has already produced the block's
compressed outputs. The threads take turns (only one runs at a time, in batch order), so the
Hessians are accumulated in the same order as the staged loop and the result is the same.
The price: every batch's activations inside the block are alive at once (a few times the cached
hidden states).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .capture import BlockInput, run_block
from .distributed import SINGLE, HessianTree, Ranks
from .errors import ModelError
from .float_stream import FloatStream
from .float_targets import CrossAccumulator
from .hessian import HessianAccumulator
from .linears import linear_shape


class _Abort(BaseException):
    """Raised inside a paused batch thread to unwind it when the block is abandoned."""


class _Batch(threading.Thread):
    """One batch's forward through the block, run as a coroutine: `step` lets it run until it
    pauses at the next group input (or finishes); `pause` is called from its hooks."""

    def __init__(self, block: nn.Module, index: int, batch: BlockInput, number: int = 0):
        super().__init__(daemon=True)
        self.block, self.index, self.batch = block, index, batch
        self.number = number  # the batch's place in this rank's share (its float inputs, `FloatStream`)
        self.go, self.back = threading.Semaphore(0), threading.Semaphore(0)
        self.at: str | None = None  # the group it is paused at
        self.output: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.aborted = False

    def run(self):
        self.go.acquire()
        try:
            if not self.aborted:
                with torch.no_grad():  # grad mode is per thread
                    self.output = run_block(self.block, self.batch, self.index)
        except BaseException as e:  # handed to the coordinating thread
            self.error = e
        self.at = None
        self.back.release()

    def pause(self, at: str) -> None:
        self.at = at
        self.back.release()
        self.go.acquire()
        if self.aborted:
            raise _Abort

    def step(self) -> None:
        self.go.release()
        self.back.acquire()
        if self.error is not None:
            raise self.error


def _pause_hook(name: str, current: dict[int, _Batch], accs: dict[str, HessianTree], sizes: dict,
                floats: FloatStream | None, crosses: dict[str, HessianTree]) -> Callable:
    """The forward pre-hook of group leader `name`: add the calling batch's input to the group's
    Hessian (and, with `floats`, its cross term with the float model's input), then pause that
    batch until the group is solved."""
    def grab(module, inp):
        thread = current.get(threading.get_ident())
        if thread is None:  # a forward outside the lockstep run (none expected)
            return
        if name in accs:  # (a second call is reported by the coordinator)
            partial = HessianAccumulator(*sizes[name])
            partial.add(inp[0])
            accs[name].push(partial)
            if name in crosses:
                partial = CrossAccumulator(*sizes[name])
                partial.add_pair(inp[0], floats.input_of(thread.number, name))
                crosses[name].push(partial)
            del partial  # this frame waits through the solve: it must not keep an [in, in] alive
        thread.pause(name)
    return grab


def lockstep_block(
    block: nn.Module,
    index: int,
    batches: Iterable[BlockInput],
    leaders: list[str],
    solve: Callable[[str, torch.Tensor], None],
    ranks: Ranks = SINGLE,
    total: int | None = None,
    floats: FloatStream | None = None,
) -> list[torch.Tensor]:
    """Run `block` (block number `index`, whose captured arguments each batch holds) over `batches`,
    solving each group at its input: `leaders` are the first linear of every group to solve (its
    input is the group's input), in any order; `solve(leader, hessian)` compresses the group in
    place. Returns the block's outputs per batch (compressed).
    ranks, total: under torch.distributed `batches` is this rank's share of `total` batches; every
    group's Hessian is then reduced across the ranks at its pause (`distributed.HessianTree`).
    floats (`--targets float`): the float model's leader inputs per batch; `solve` is then called
    as solve(leader, hessian, cross) with the group's cross term (`float_targets`) for each leader
    whose inputs it holds."""
    threads = [_Batch(block, index, b, i) for i, b in enumerate(batches)]
    current: dict[int, _Batch] = {}
    sizes = {name: (linear_shape(block.get_submodule(name))[1], block.get_submodule(name).weight.device) for name in leaders}
    # one partial H per batch, summed along the fixed tree the staged path uses (same bits on any ranks)
    total = len(threads) if total is None else total
    accs = {name: HessianTree(ranks, total, *sizes[name]) for name in leaders}
    crosses = {name: HessianTree(ranks, total, *sizes[name], CrossAccumulator)
               for name in leaders if floats is not None and floats.holds(name)}
    handles = [block.get_submodule(name).register_forward_pre_hook(_pause_hook(name, current, accs, sizes, floats,
                                                                               crosses)) for name in leaders]
    try:
        for t in threads:
            t.start()
            current[t.ident] = t
        for t in threads:
            t.step()
        while any(t.at is not None for t in threads):
            points = {t.at for t in threads}
            name = points.pop()
            if points or name not in accs:
                raise ModelError(
                    f"the batches of one block paused at {sorted(map(str, points | {name}))}: its linears do not "
                    "run once per forward, in the same order for every batch (use lockstep=False)"
                )
            _solve_at(name, accs, crosses, floats, solve)
            for t in threads:
                t.step()
        if accs:
            raise ModelError(f"{', '.join(accs)} never ran in the block's forward (use lockstep=False)")
        return [t.output for t in threads]
    finally:
        for h in handles:
            h.remove()
        for t in threads:  # unwind any thread still paused (after an error)
            if t.is_alive():
                t.aborted = True
                t.go.release()
        for t in threads:
            t.join()


def _solve_at(name: str, accs: dict[str, HessianTree], crosses: dict[str, HessianTree], floats: FloatStream | None,
              solve: Callable) -> None:
    """Every batch paused at group leader `name`: solve the group from its complete Hessian (and cross term)."""
    hessian = accs.pop(name).result().take_hessian()
    if name not in crosses:  # compressed targets, or a group the float targets leave out
        solve(name, hessian)
        return
    solve(name, hessian, crosses.pop(name).result().take_hessian())
    floats.drop(name)  # its float inputs are spent
