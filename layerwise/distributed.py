"""Data-parallel calibration on torch.distributed: the same checkpoint bytes on any number of ranks.

Launched by `torchrun` or `accelerate launch` (they set RANK, WORLD_SIZE, MASTER_ADDR, …): gloo on
CPUs, NCCL on GPUs. The calibration batches (`batch_size` windows each, the same batches whatever the
world size) are split into contiguous shares, one per rank; each rank streams only its share.

Same bytes on 1, 2 or 4 ranks: the per-batch partial Hessians are summed along one fixed binary tree
over the batch indices (split at the middle of each range). A rank sums the subtrees that lie wholly
inside its share; those subtree sums are broadcast, and every rank finishes the top of the same tree.
A single process walks the same tree, so every addition happens with the same operands in the same
order whatever the partition. Layers are solved round-robin across ranks and broadcast by their
solver. Rank 0 alone writes the checkpoint; the others replay what it read on `--resume`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from .errors import LayerwiseError, PeerError, RecipeError
from .formats import CompressedWeight
from .hessian import HessianAccumulator, ParkedHessian

log = logging.getLogger(__name__)

T = TypeVar("T")
Span = tuple[int, int]  # [lo, hi) batch indices: one node of the reduction tree


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (cuda:LOCAL_RANK with NCCL)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, total: int, rank: int | None = None) -> range:
        """The contiguous batch indices of `rank` (default: this one) among `total` batches."""
        r = self.rank if rank is None else rank
        return range(r * total // self.world, (r + 1) * total // self.world)

    def solves(self, job: int) -> bool:
        """Layers are dealt round-robin: job `job` of a block is solved by rank job % world."""
        return job % self.world == self.rank

    def broadcast_object(self, obj, src: int):
        """`obj` from rank `src` on every rank (pickled; tensors should be on the CPU)."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == src else None]
        _collective(lambda: dist.broadcast_object_list(box, src=src, device=self._object_device()))
        return box[0]

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite `tensor` on every rank with rank `src`'s (in place, on this rank's device)."""
        if self.world > 1:
            moved = tensor.to(self.device)
            _collective(lambda: dist.broadcast(moved, src=src))
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def _object_device(self):
        return self.device if self.device.type == "cuda" else None


SINGLE = Ranks()


def from_environment(device: str, timeout_s: float) -> tuple[Ranks, str]:
    """Join the group torchrun / accelerate describe in the environment (WORLD_SIZE > 1); returns the
    ranks and the compute device for this rank (cuda → cuda:LOCAL_RANK). No environment: one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if timeout_s <= 0:
        raise RecipeError(f"--dist-timeout {timeout_s:g} must be positive (seconds)")
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if gpu:
        if not torch.cuda.is_available():
            raise RecipeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    log.debug("rank %d of %d on %s", rank, world, device)
    return Ranks(rank, world, torch.device(device if gpu else "cpu")), device


def leave(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _collective(call: Callable[[], object]):
    """Run one collective; a peer that died or hung becomes one actionable line."""
    try:
        return call()
    except (RuntimeError, dist.DistError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerError(
            f"another rank stopped or did not answer within --dist-timeout ({first[:160]}); the complete "
            "blocks are kept: rerun the same command with --resume"
        ) from None


# ---- the fixed reduction tree ------------------------------------------------------------------

def cover(lo: int, hi: int, share: range) -> list[Span]:
    """The largest tree nodes under [lo, hi) that lie wholly inside `share`, left to right."""
    if hi <= share.start or lo >= share.stop or lo >= hi:
        return []
    if share.start <= lo and hi <= share.stop:
        return [(lo, hi)]
    mid = (lo + hi) // 2
    return cover(lo, mid, share) + cover(mid, hi, share)


def tree_sum(leaves: Iterator[T], lo: int, hi: int, add: Callable[[T, T], T], known: dict[Span, T] | None = None,
             park: Callable[[T], T] | None = None) -> T:
    """Sum of node [lo, hi): `known[(lo, hi)]` if given, else left + right, pulling leaves in order.
    park (optional): puts a left sum out of memory while its right sibling is summed; `add` then
    gets the parked value as its left operand."""
    if known is not None and (lo, hi) in known:
        return known[(lo, hi)]
    if hi - lo == 1:
        return next(leaves)
    mid = (lo + hi) // 2
    left = tree_sum(leaves, lo, mid, add, known, park)
    if park is not None:
        left = park(left)
    return add(left, tree_sum(leaves, mid, hi, add, known, park))


class TreeSum:
    """`tree_sum`'s additions for values handed over one at a time, in batch order (lockstep solving
    receives each batch's Hessian from a hook rather than pulling it): the same operands added in the
    same order, holding only the partial sums of the open subtrees."""

    def __init__(self, total: int, add: Callable[[T, T], T]):
        self.add, self.stack, self.remaining = add, [], total
        self.ops = iter(list(_postorder(0, total)))
        next(self.ops, None)  # the first step is always the first leaf

    def push(self, value: T) -> None:
        self.remaining -= 1
        self.stack.append(value)
        for op in self.ops:  # the additions that complete subtrees, up to the next leaf
            if op == "leaf":
                break
            right = self.stack.pop()
            self.stack.append(self.add(self.stack.pop(), right))

    def ops_left(self) -> bool:
        """Whether more leaves are expected (the post-order has steps left)."""
        return self.remaining > 0

    def result(self) -> T:
        if len(self.stack) != 1 or self.remaining:
            raise RuntimeError("TreeSum.result() before every leaf was pushed")
        return self.stack[0]


def _postorder(lo: int, hi: int) -> Iterator[str]:
    """The tree of `tree_sum` over [lo, hi) in post-order: "leaf" and "add" steps."""
    if hi - lo <= 0:
        return
    if hi - lo == 1:
        yield "leaf"
        return
    mid = (lo + hi) // 2
    yield from _postorder(lo, mid)
    yield from _postorder(mid, hi)
    yield "add"


def reduce_batches(ranks: Ranks, leaves: Iterator[T], total: int, add: Callable[[T, T], T],
                   blank: Callable[[], T], broadcast: Callable[[T, int], T], park: Callable[[T], T] | None = None) -> T:
    """Σ over all `total` batches along the fixed tree; `leaves` yields this rank's share's batch
    values in order. blank(): an empty value to receive into; broadcast(value, src): in place;
    park: see `tree_sum`."""
    if total == 0:
        return blank()
    mine = {span: tree_sum(leaves, *span, add, park=park) for span in cover(0, total, ranks.share(total))}
    return finish_tree(ranks, total, mine, add, blank, broadcast)


def finish_tree(ranks: Ranks, total: int, mine: dict[Span, T], add: Callable[[T, T], T],
                blank: Callable[[], T], broadcast: Callable[[T, int], T]) -> T:
    """The root of the tree from this rank's subtree sums `mine`: every rank's sums are broadcast in
    rank order and the top of the tree is added up the same way on every rank."""
    if ranks.world == 1:
        return mine[(0, total)]
    known: dict[Span, T] = {}
    for r in range(ranks.world):
        for span in cover(0, total, ranks.share(total, r)):
            known[span] = broadcast(mine[span] if r == ranks.rank else blank(), r)
    return tree_sum(iter(()), 0, total, add, known)


def reduce_hessians(ranks: Ranks, leaves: Iterator[dict[str, HessianAccumulator]], total: int,
                    blank: Callable[[], dict[str, HessianAccumulator]],
                    park_dir: Path | None = None) -> dict[str, HessianAccumulator]:
    """`reduce_batches` for {layer name: one batch's HessianAccumulator}. park_dir: a left subtree's
    sums wait in files there while the right one is summed (`HessianAccumulator.park`: the same
    additions, one [in, in] per layer in memory instead of one per open tree level)."""

    def add(a, b):
        for name, acc in a.items():
            if isinstance(acc, ParkedHessian):
                a[name] = acc.add_into(b[name])
            else:
                acc.merge(b[name])
        return a

    def park(value):
        return {name: acc.park(park_dir) for name, acc in value.items()}

    def broadcast(value, src):
        for acc in value.values():
            _broadcast_accumulator(ranks, acc, src)
        return value

    return reduce_batches(ranks, leaves, total, add, blank, broadcast, park if park_dir is not None else None)


class HessianTree:
    """One linear's Hessian over all `total` batches, fed this rank's per-batch partials in batch order
    (lockstep solving is handed them by hooks): each subtree inside this rank's share is summed with a
    `TreeSum`; `result()` broadcasts those sums and finishes the top of the same tree — the additions
    of `reduce_hessians`, so lockstep and staged runs on any number of ranks give the same bits.
    kind: the accumulator class (a `float_targets.CrossAccumulator` for a cross term)."""

    def __init__(self, ranks: Ranks, total: int, in_features: int, device, kind: type = HessianAccumulator):
        self.ranks, self.total = ranks, total
        self.blank = lambda: kind(in_features, device)
        self.spans = iter(cover(0, total, ranks.share(total)))
        self.sums: dict[Span, HessianAccumulator] = {}
        self.open: tuple[Span, TreeSum] | None = None

    def push(self, partial: HessianAccumulator) -> None:
        if self.open is None:
            span = next(self.spans)
            self.open = (span, TreeSum(span[1] - span[0], _merge))
        span, tree = self.open
        tree.push(partial)
        if not tree.ops_left():
            self.sums[span] = tree.result()
            self.open = None

    def result(self) -> HessianAccumulator:
        return finish_tree(self.ranks, self.total, self.sums, _merge, self.blank,
                           lambda acc, src: _broadcast_accumulator(self.ranks, acc, src))


def _merge(a: HessianAccumulator, b: HessianAccumulator) -> HessianAccumulator:
    return a.merge(b)


def _broadcast_accumulator(ranks: Ranks, acc: HessianAccumulator, src: int) -> HessianAccumulator:
    ranks.broadcast_(acc.sum, src)
    acc.rows = int(ranks.broadcast_(torch.tensor([acc.rows], dtype=torch.int64), src))
    return acc


def check_batches(ranks: Ranks, total: int) -> None:
    if total < ranks.world:
        raise RecipeError(f"{ranks.world} ranks but only {total} calibration batches; use fewer ranks, more "
                          "--nsamples or a smaller --batch-size")


# ---- solved layers and the writer --------------------------------------------------------------

def share_solved(ranks: Ranks, solved: dict[int, T], jobs: int) -> list[T]:
    """Every job's result on every rank, in job order (`solved`: this rank's, by job number)."""
    if ranks.world == 1:
        return [solved[j] for j in range(jobs)]
    return [ranks.broadcast_object(solved.get(j), j % ranks.world) for j in range(jobs)]


def portable(cw: CompressedWeight) -> tuple[dict, dict[str, torch.Tensor]]:
    """A compressed weight as (meta, packed CPU tensors): what goes over the wire."""
    return cw.meta(), {k: v.detach().cpu() for k, v in cw.to_tensors().items()}


class SharedWriter:
    """The checkpoint writer as every rank sees it: rank 0 writes; `blocks_done` and the blocks a
    resumed run reads come from rank 0 (its disk may be the only one holding the partial output)."""

    def __init__(self, ranks: Ranks, writer=None):
        self.ranks, self.writer = ranks, writer
        self.blocks_done = ranks.broadcast_object(writer.blocks_done if ranks.main else None, 0)

    def __getattr__(self, name):  # write_rest, commit, reports: rank 0's own writer
        return getattr(self.__dict__["writer"], name)

    def write_block(self, index, compressed, plain, reports=None) -> None:
        if self.ranks.main:
            self.writer.write_block(index, compressed, plain, reports)

    def read_block(self, index: int) -> dict[str, CompressedWeight]:
        packed = {n: portable(cw) for n, cw in self.writer.read_block(index).items()} if self.ranks.main else None
        packed = self.ranks.broadcast_object(packed, 0)
        return {name: CompressedWeight.from_tensors(meta, tensors) for name, (meta, tensors) in packed.items()}


@contextlib.contextmanager
def opened_on_main(ranks: Ranks, open_writer: Callable[[], contextlib.AbstractContextManager]):
    """Rank 0 opens the real writer; a refusal there (e.g. --resume with other arguments) stops
    every rank with the same message instead of leaving them waiting."""
    if ranks.world == 1:
        with open_writer() as writer:
            yield writer
        return
    if not ranks.main:
        error = ranks.broadcast_object(None, 0)
        if error is not None:
            raise LayerwiseError(f"rank 0 could not open the output: {error}")
        yield SharedWriter(ranks)
        return
    try:
        manager = open_writer()
        writer = manager.__enter__()
    except Exception as e:
        ranks.broadcast_object(str(e) or type(e).__name__, 0)
        raise
    ranks.broadcast_object(None, 0)
    with contextlib.ExitStack() as stack:
        stack.push(manager)
        yield SharedWriter(ranks, writer)
