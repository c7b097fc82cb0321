"""The block walker: stream calibration batches through the model one block at a time.

For each block: onload it, collect one Hessian per group of linears sharing an input (stage by
stage by default, so later stages see the earlier stages' error), hand each group to a
`GroupSolver` (compress it, or measure candidates), forward again to produce the next block's
inputs, hand the block to a `BlockSink`, offload.

A solver that needs no data (RTN, magnitude, k-means only) streams nothing: each block's linears
are handed over from their weights alone. `LayerwiseCompressor` is the walker with the compressing
solver (`compressing.Compressing`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from layerwise.models.families import Family, get_module, resolve_family

from .activations import Activations
from .block_hessians import collect_hessians, discover_groups, lm_head_hessian
from .capture import capture_block_inputs, run_block
from .compressing import Compressing, LayerReport
from .devices import resolve_device
from .distributed import SINGLE, Ranks, check_batches
from .dtypes import kept_dtype
from .errors import RecipeError
from .float_stream import FloatStream, leader_bytes_per_token
from .float_targets import DEFAULT_ALPHA, check_alpha, check_targets, fitted_leaders, is_float
from .formats import CompressedWeight
from .lazy import LazyBlocks
from .linears import is_compressible, linear_shape, put_dense
from .magr import applies_to
from .lockstep import lockstep_block
from .matmul_precision import fast_matmul_is_accurate, matmul_precision
from .memory import available_memory, give_back_large_frees, trim_heap
from .placement import move_outside, onload, put_outside
from .plan import embedding_config, left_out, plan_layers
from .recipe import Recipe
from .solvers import MethodConfig
from .upcast import restore_linears

__all__ = [
    "BlockSink", "BlockWalker", "CompressionResult", "GroupSolver", "LayerReport", "LayerwiseCompressor",
    "collect_hessians", "discover_groups", "resolve_device",
]

log = logging.getLogger(__name__)


class BlockSink(Protocol):
    """Where the walker hands each finished block (`checkpoint.CheckpointWriter`, `distributed.RankWriter`)."""

    @property
    def blocks_done(self) -> int:
        """Blocks 0 … n-1 are written already (a resumed run): they are replayed, not solved."""

    def write_block(self, index: int, compressed: dict[str, CompressedWeight], plain: dict[str, torch.Tensor],
                    reports: dict[str, dict] | None = None) -> None:
        """Block `index` (or len(blocks): the lm_head): its compressed layers, its other tensors by
        full name, and the solver's manifest entries of its layers."""

    def read_block(self, index: int) -> dict[str, CompressedWeight]:
        """The compressed layers of a block written before."""


class GroupSolver(Protocol):
    """What the walker does with the layers of one block that share an input (one Hessian)."""

    @property
    def layers(self) -> Collection[str]:
        """The full names of the layers to hand over (the lm_head's too, when it is one)."""

    @property
    def needs_data(self) -> bool:
        """Whether some layer needs its inputs' Hessian (otherwise no calibration is streamed)."""

    def solve_group(self, linears: dict[str, nn.Module], hessian: torch.Tensor | None) -> dict[str, CompressedWeight]:
        """linears: {full name: nn.Linear or Conv1D} sharing one input; hessian: [in, in] float32 of
        that input (None: no data streamed). Returns what to hand to the sink for them ({}: nothing);
        the weights the solver leaves in the modules are what the next stages and blocks see. With
        float targets it is called with `cross=` too ([in, in] float32, `float_targets`)."""

    def reports_of(self, names: Iterable[str]) -> dict[str, dict]:
        """The manifest entries of the layers `names`, handed to the sink with their block."""


@dataclass
class CompressionResult:
    layers: list[LayerReport]
    compressed: dict[str, CompressedWeight]  # empty when the writer took ownership
    seconds: float  # capture + all blocks (no model load, no evaluation)
    left_out: dict = field(default_factory=dict)  # block weights kept in float16 and why (linears.left_out_summary)
    # compressed layers outside the blocks (the token embedding), which the caller writes with the rest
    outside: dict[str, CompressedWeight] = field(default_factory=dict)


@dataclass
class _Walk:
    """One walk's parties: the solver, the sink (None: keep what it returns), the block-output consumer."""

    solver: GroupSolver
    sink: BlockSink | None
    on_block_output: Callable[[int, list[torch.Tensor]], None] | None
    batches: Activations | None = None
    kept: dict[str, CompressedWeight] = field(default_factory=dict)
    floats: FloatStream | None = None  # the float model's block inputs (`--targets float`)


class BlockWalker:
    """Walk `model`'s blocks for a `GroupSolver`.

    lazy: reads each block's weights when it is reached (`layerwise.lazy.open_lazy`); None: the
    blocks are in memory. offload_dir: keep the calibration activations memory-mapped there.
    staged: one Hessian pass per stage of the block (later stages see the earlier stages' solved
    weights); False: one pass for all groups. lockstep: staged solving of a declared family in one
    forward per block (lockstep.py; same result, every batch's block activations in memory at once;
    not with offload_dir); False: one forward per stage; "auto": lockstep when its extra activations
    fit (`_choose_lockstep`). ranks: this process's share of the batches under torch.distributed.
    fast_matmul: float32 products through bfloat16 units where that keeps float32 accuracy on the
    device (`matmul_precision`). float_targets: fit each layer to the float model's outputs
    (`--targets float`, float_targets.py): the float model's block inputs are carried beside the
    compressed ones (float_stream.py) and each fitted group is handed its cross term too (all of
    them with `fit_every`, else all but a block's widest input: `float_targets.fitted_leaders`)."""

    def __init__(self, model: nn.Module, device: str = "auto", batch_size: int = 8, staged: bool = True,
                 lazy: LazyBlocks | None = None, offload_dir: str | Path | None = None, lockstep: bool | str = "auto",
                 ranks: Ranks = SINGLE, fast_matmul: bool = True, float_targets: bool = False,
                 fit_every: bool = False):
        self.ranks = ranks
        self.float_targets = float_targets
        self.fit_every = fit_every
        self.total_batches = 0  # calibration batches over all ranks (this rank holds its share)
        self.lockstep = lockstep if offload_dir is None else False
        self.model = model
        self.lazy = lazy
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self.device = resolve_device(device)
        self.fast_matmul = fast_matmul and fast_matmul_is_accurate(self.device)
        self.batch_size = batch_size
        self.staged = staged
        self.family: Family = resolve_family(model)
        self.blocks: nn.ModuleList = get_module(model, self.family.blocks)

    @torch.no_grad()
    def walk(self, solver: GroupSolver, windows: torch.Tensor | None, sink: BlockSink | None = None,
             on_block_output: Callable[[int, list[torch.Tensor]], None] | None = None) -> dict[str, CompressedWeight]:
        """windows: [N, L] token ids (unused, may be None, when nothing is streamed). Returns what
        the solver gave for every layer when there is no sink ({} otherwise).

        With calibration batches each block is solved on its inputs and then forwarded to make the
        next block's; a solver that needs no data skips both (unless `on_block_output` wants the
        outputs). A sink that has `blocks_done` > 0 (a resumed run) gets only the blocks after those;
        the batches are streamed through the already-written blocks to rebuild the next block's inputs.
        A compressed token embedding is solved first and returned in any case (no sink takes it)."""
        with matmul_precision("medium") if self.fast_matmul else contextlib.nullcontext():
            return self._walk(_Walk(solver, sink, on_block_output), windows)

    def _walk(self, walk: _Walk, windows) -> dict[str, CompressedWeight]:
        self.model.eval()
        if self.offload_dir is not None:  # the low-memory mode: one block's temporaries at a time, not
            give_back_large_frees()  # every block's fragments (an mmap per large temporary: ~20 % more CPU)
        trim_heap()  # what reading the model and tokenizing the calibration text left in the heaps
        streamed = walk.solver.needs_data or walk.on_block_output is not None
        if windows is None and streamed:
            raise RecipeError("this recipe needs calibration data (a method solves with a Hessian); pass windows")
        done = walk.sink.blocks_done if walk.sink is not None else 0
        try:
            self._start_streams(walk, windows, streamed)
            if self.lazy is not None:
                self.lazy.release_outside()  # read again for the lm_head and the checkpoint
            self._log_memory_estimate(windows, walk.batches)
            if walk.batches is not None:
                self._choose_lockstep(walk.batches, walk.floats is not None)
            todo = range(len(self.blocks)) if streamed else range(min(done, len(self.blocks)), len(self.blocks))
            desc = "compressing blocks" if streamed else "compressing blocks (data-free)"
            for index in tqdm(todo, desc=desc, unit="block", disable=None if self.ranks.main else True):
                self._process_block(index, walk, replay=index < done)
            if self.lazy is not None:
                self.lazy.load_outside()
                for name in set(walk.kept) & {self.family.embeddings}:  # read again as stored
                    put_outside(get_module(self.model, name), walk.kept[name])
            if self.family.lm_head in walk.solver.layers and done <= len(self.blocks):
                self._process_head(walk)
        finally:
            if walk.batches is not None:
                walk.batches.close()
            if walk.floats is not None:
                walk.floats.close()
        return walk.kept

    def _start_streams(self, walk: _Walk, windows, streamed: bool) -> None:
        """Compress a token embedding first (the blocks calibrate on what the compressed model
        computes), then catch the block-0 inputs; with float targets the float model's too, caught
        before the embedding is compressed when it is."""
        embedding = self.family.embeddings in walk.solver.layers
        if self.float_targets and streamed and embedding:
            caught = self._capture_on_device(windows)
            walk.floats = FloatStream(caught, self.offload_dir, self.device)
            caught.close()
        if embedding:
            self._process_embedding(walk)
        if streamed:
            walk.batches = self._capture_on_device(windows)
            if self.float_targets and walk.floats is None:
                walk.floats = FloatStream(walk.batches, self.offload_dir, self.device)

    def _capture_on_device(self, windows) -> Activations:
        with self._outside_on_device(head=False):  # only for the capture: float32 embeddings are big
            return self._capture(windows)

    @contextlib.contextmanager
    def _outside_on_device(self, head: bool = True):
        """The tensors outside the blocks on the device in float32, given back (`dtypes.kept_dtype`) after.
        head=False leaves the final norm and lm_head as they are: the capture stops before them
        (an untied lm_head in float32 is as big as the embeddings)."""
        after = () if head else tuple(p + "." for p in (self.family.final_norm, self.family.lm_head) if p)
        skip = (self.family.blocks + ".",) + after
        stored = move_outside(self.model, skip, self.device)
        try:
            yield
        finally:
            move_outside(self.model, skip, torch.device("cpu"), stored)

    def _process_block(self, index: int, walk: _Walk, replay: bool) -> None:
        """Onload block `index`, solve it (or, `replay`, put back its written compressed weights), make
        the next block's inputs, offload it and hand it to the sink."""
        block = self.blocks[index]
        if self.lazy is not None:
            self.lazy.load(index, block)
        keep_dtype, upcast = onload(block, self.device)
        outputs = None
        if replay:
            if walk.floats is not None:  # the block still holds its float weights (read again by the lazy reader)
                walk.floats.advance(block, index)
            compressed = walk.sink.read_block(index)
            for name, cw in compressed.items():
                put_dense(get_module(self.model, name), cw)
        elif walk.batches is not None:
            compressed, outputs = self._solve_block(walk, index, block)
        else:
            compressed = walk.solver.solve_group({name: module for rel, module in block.named_modules()
                                                  if (name := self._name(index, rel)) in walk.solver.layers}, None)
        if walk.batches is not None:  # the next block sees this block's solved outputs
            if outputs is None:
                walk.batches.advance(lambda batch: run_block(block, batch, index))
            else:  # the lockstep forward made them already
                ready = iter(outputs)
                walk.batches.advance(lambda batch: next(ready))
            if walk.on_block_output is not None:
                walk.on_block_output(index, walk.batches.hidden_states())
        block.to(device="cpu", dtype=keep_dtype)
        restore_linears(upcast)
        if not replay:
            self._hand_over(walk, index, block, compressed)
        if self.lazy is not None:
            self.lazy.release(block)
        trim_heap()

    def _capture(self, windows: torch.Tensor) -> Activations:
        """Block-0 inputs of this rank's calibration batches, stored as they are caught (so that
        offloaded activations never sit in memory all at once)."""
        batches = Activations(self.offload_dir, self.device)
        self.total_batches = -(-windows.shape[0] // self.batch_size)
        check_batches(self.ranks, self.total_batches)
        for b in self.ranks.share(self.total_batches):
            s = b * self.batch_size
            for batch in capture_block_inputs(self.model, self.blocks, windows[s : s + self.batch_size],
                                              self.batch_size, self.device):
                batches.append(batch)
        return batches

    def _log_memory_estimate(self, windows, batches) -> None:
        """Working set before starting: one float32 block, the activations, the largest Hessians."""
        block = self.blocks[0]
        block_bytes = 4 * sum(p.numel() for p in block.parameters())
        widths = sorted({linear_shape(m)[1] for m in block.modules() if is_compressible(m)})
        hessian_bytes = 4 * widths[-1] ** 2 if widths else 0
        act_bytes = batches.nbytes() if batches is not None else 0
        where = f"on disk under {self.offload_dir}" if self.offload_dir is not None else "in memory"
        log.info(
            "memory estimate: one block in float32 %.0f MB, activations %s %.0f MB (%s), largest Hessian %.0f MB "
            "(the solver holds a few [in, in] copies)",
            block_bytes / 1e6, "x".join(map(str, windows.shape)) if windows is not None else "-", act_bytes / 1e6,
            where, hessian_bytes / 1e6,
        )

    def _choose_lockstep(self, batches: Activations, float_targets: bool) -> None:
        """"auto": lockstep when its extra memory fits comfortably. Every batch then waits inside the
        block at once, each holding about its widest linear input (the MLP intermediate) and two
        hidden-wide tensors per token in float32, on top of the widest group's solve; with float
        targets the float model's inputs of the block's group leaders are held beside them (the
        float stream's own block inputs are already in memory). Allowed: a quarter of the memory
        available now. Otherwise the staged path, which gives the same bytes with one forward per
        stage (about 2.6 block forwards instead of one: issue 15's speed)."""
        if self.lockstep != "auto":
            return
        block = self.blocks[0]
        widths = [linear_shape(m)[1] for m in block.modules() if is_compressible(m)]
        hidden = batches.hidden_width()
        extra = 4 * batches.tokens() * (max(widths, default=hidden) + 2 * hidden)
        if float_targets:
            extra += batches.tokens() * leader_bytes_per_token(block, self.family.groups, self.fit_every)
        have = available_memory()
        self.lockstep = have is None or 4 * extra <= have
        log.info("lockstep solving %s: every batch paused inside a block holds about %.0f MB%s",
                 "on" if self.lockstep else "off, one forward per stage (same result)", extra / 1e6,
                 f" (allowed: a quarter of {have / 1e6:.0f} MB available)" if have else "")

    def _solve_block(self, walk: _Walk, index: int, block: nn.Module) -> tuple[dict[str, CompressedWeight], list | None]:
        """What the solver gave for the block's layers, and its outputs per batch when the lockstep
        forward already produced them (None: the caller runs the block again)."""
        if self.staged and self.lockstep and self.family.groups is not None:
            return self._solve_block_lockstep(walk, index, block)
        groups = self.family.groups or discover_groups(block, index, walk.batches[0])
        stages = [[g] for g in groups] if self.staged else [list(groups)]
        if walk.floats is not None:  # before any stage changes the block: its float weights' view
            walk.floats.record(block, index, self._fitted(block, groups, self._groups_to_solve(walk, index, groups)))
        compressed = {}
        for stage in stages:
            todo = self._groups_to_solve(walk, index, stage)
            if not todo:
                continue
            crosses = {}
            hessians = collect_hessians(block, index, [g[0] for g in todo], walk.batches,
                                        stop_early=self.family.groups is not None, ranks=self.ranks,
                                        total=self.total_batches, park_dir=self.offload_dir, floats=walk.floats,
                                        crosses=crosses)
            for group in todo:
                compressed.update(self._solve_group(walk, index, block, group, hessians.pop(group[0]),
                                                    crosses.pop(group[0], None)))
                if walk.floats is not None:
                    walk.floats.drop(group[0])
        return compressed, None

    def _fitted(self, block: nn.Module, groups, solving) -> list[str]:
        """The leaders of the groups `solving` (some of the block's `groups`) fitted to float targets:
        `float_targets.fitted_leaders` of all the block's groups, whatever the recipe solves."""
        fitted = set(fitted_leaders(block, [g[0] for g in groups], self.fit_every))
        return [g[0] for g in solving if g[0] in fitted]

    def _groups_to_solve(self, walk: _Walk, index: int, groups) -> list:
        return [g for g in groups if any(self._name(index, n) in walk.solver.layers for n in g)]

    def _solve_block_lockstep(self, walk: _Walk, index: int, block: nn.Module):
        groups = {g[0]: g for g in self._groups_to_solve(walk, index, self.family.groups)}
        compressed = {}
        if walk.floats is not None:
            walk.floats.record(block, index, self._fitted(block, self.family.groups, list(groups.values())))

        def solve(leader, hessian, cross=None):
            compressed.update(self._solve_group(walk, index, block, groups[leader], hessian, cross))

        outputs = lockstep_block(block, index, walk.batches, list(groups), solve, self.ranks, self.total_batches,
                                 walk.floats)
        return compressed, outputs

    def _solve_group(self, walk: _Walk, index, block, group, hessian, cross=None) -> dict[str, CompressedWeight]:
        """Hand the solver the layers of one input group that it solves (and their cross term, with float targets)."""
        linears = {name: block.get_submodule(rel) for rel in group if (name := self._name(index, rel)) in walk.solver.layers}
        return _hand(walk.solver, linears, hessian, cross)

    def _process_embedding(self, walk: _Walk) -> None:
        """The token embedding [vocab, hidden] as a layer of a data-free method, before the capture,
        so that the blocks calibrate on what the compressed model computes; a tied lm_head is the
        same tensor and so sees the same values."""
        name = self.family.embeddings
        module = get_module(self.model, name)
        module.weight.data = module.weight.data.to(kept_dtype(module.weight.dtype))  # bfloat16 cannot hold them
        walk.kept.update(walk.solver.solve_group({name: module}, None))

    def _process_head(self, walk: _Walk) -> None:
        """The lm_head, solved on norm(last block's outputs) with the tensors outside the blocks on the device."""
        name = self.family.lm_head
        with self._outside_on_device():
            head = get_module(self.model, name)
            hessian = cross = None
            if walk.batches is not None:
                hessian, cross = lm_head_hessian(get_module(self.model, self.family.final_norm), head, walk.batches,
                                                 self.device, self.ranks, self.total_batches,
                                                 walk.floats.hidden if walk.floats is not None else None)
            compressed = _hand(walk.solver, {name: head}, hessian, cross)
        if walk.sink is not None:
            walk.sink.write_block(len(self.blocks), compressed, {}, walk.solver.reports_of([name]))
        else:
            walk.kept.update(compressed)

    def _hand_over(self, walk: _Walk, index: int, block: nn.Module, compressed: dict[str, CompressedWeight]) -> None:
        if walk.sink is None:
            walk.kept.update(compressed)
            return
        plain = {}
        for rel, tensor in block.state_dict().items():
            name = self._name(index, rel)
            if name.removesuffix(".weight") not in compressed:
                plain[name] = tensor
        walk.sink.write_block(index, compressed, plain, walk.solver.reports_of(compressed))

    def _name(self, index: int, rel: str) -> str:
        return f"{self.family.blocks}.{index}.{rel}"


def _hand(solver: GroupSolver, linears: dict[str, nn.Module], hessian, cross) -> dict[str, CompressedWeight]:
    """solver.solve_group, with `cross=` only under float targets (solvers without them take no such argument)."""
    if cross is None:
        return solver.solve_group(linears, hessian)
    return solver.solve_group(linears, hessian, cross=cross)


class LayerwiseCompressor:
    """Compress `model` in place, block by block, with the methods `recipe` assigns: the block
    walker with the compressing group solver."""

    def __init__(self, model: nn.Module, recipe: Recipe, device: str = "auto", batch_size: int = 8, staged: bool = True,
                 sensitivity: dict[str, torch.Tensor] | None = None, lazy: LazyBlocks | None = None,
                 offload_dir: str | Path | None = None, stack: bool = True, lockstep: bool | str = "auto",
                 ranks: Ranks = SINGLE, fast_matmul: bool = True, targets: str = "compressed",
                 float_alpha: float | None = None, magr: bool = False):
        """sensitivity: {layer name: [out, in]} for recipes with `sensitivity: fisher` (skm), e.g.
        from `layerwise.sensitivity.fisher_sensitivity(model, loss_fn, data)`.
        stack: solve the layers of one input group with one config as one stacked matrix
        (stacking.py; same result). ranks: this process's share of the batches and layers under
        torch.distributed (`distributed`). targets: "compressed" (each layer fits its own weights'
        outputs on the compressed model's inputs) or "float" (the float model's outputs, float_targets.py);
        float_alpha: with "float", the fraction of the step from W to the float fit W* (None:
        float_targets.DEFAULT_ALPHA). magr: shrink each grid-quantized layer's weight range before
        it is solved (`magr.py`). The other arguments: `BlockWalker`'s."""
        check_targets(targets)
        check_alpha(float_alpha, targets)
        self.float_alpha = DEFAULT_ALPHA if float_alpha is None else float_alpha
        self.walker = BlockWalker(model, device, batch_size, staged, lazy, offload_dir, lockstep, ranks, fast_matmul,
                                  float_targets=is_float(targets), fit_every=targets == "float-all")
        self.model = model
        self.recipe = recipe
        self.sensitivity = sensitivity or {}
        self.stack = stack
        self.ranks = ranks
        self.plan: dict[str, MethodConfig] = plan_layers(model, self.family, recipe.config_for, recipe.names_lm_head(),
                                                         self.sensitivity, embedding_config(recipe, self.family))
        self.left_out = left_out(model, self.family, self.plan)
        self.magr = magr
        if magr and not any(applies_to(config) for config in self.plan.values()):
            raise RecipeError("--magr shrinks the range of integer grids solved with a Hessian, and no layer of the "
                              "recipe has one; drop --magr or use gptq, or sparsegpt with bits")
        if is_float(targets) and not self.needs_data:
            raise RecipeError("--targets float fits the float model's outputs on calibration data, but every method in "
                              "the recipe is data-free; drop --targets float or use gptq, sparsegpt or skm")

    @property
    def family(self) -> Family:
        return self.walker.family

    @property
    def device(self) -> torch.device:
        return self.walker.device

    @property
    def fast_matmul(self) -> bool:
        return self.walker.fast_matmul

    @property
    def lockstep(self) -> bool | str:
        """"auto" until a streamed compress has chosen (`BlockWalker._choose_lockstep`)."""
        return self.walker.lockstep

    @property
    def needs_data(self) -> bool:
        """Some layer's method needs its inputs (a Hessian); otherwise no calibration is streamed."""
        return any(config.needs_hessian for config in self.plan.values())

    def compress(self, windows: torch.Tensor | None, writer: BlockSink | None = None,
                 on_block_output: Callable[[int, list[torch.Tensor]], None] | None = None) -> CompressionResult:
        """windows: [N, L] token ids (unused, may be None, for a data-free recipe). Returns the
        per-layer report (and the weights, without a writer); see `BlockWalker.walk`."""
        start = time.perf_counter()
        solver = Compressing(self.plan, self.sensitivity, self.stack, self.ranks, self.float_alpha, self.magr)
        kept = self.walker.walk(solver, windows, writer, on_block_output)
        outside = {name: cw for name, cw in kept.items() if name == self.family.embeddings}
        if writer is not None:
            kept = {}
        return CompressionResult(solver.reports, kept, time.perf_counter() - start, self.left_out, outside)
