"""LayerwiseCompressor: stream calibration batches through the model one block at a time.

For each block: onload it, collect one Hessian per group of linears sharing an input (stage by
stage by default, so later stages see the earlier stages' error), solve each linear, forward again
with the compressed weights to produce the next block's inputs, hand the block to the writer, offload.

A recipe whose every method is data-free (RTN, magnitude, k-means) streams nothing: each block's
linears are solved from their weights alone, and the report's error is measured in weight space.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from layerwise.models.families import Family, get_module, resolve_family

from .activations import Activations
from .capture import BlockInput, StopForward, capture_block_inputs, run_block
from .dtypes import COMPUTE_DTYPE, kept_dtype
from .distributed import SINGLE, Ranks, check_batches, portable, reduce_hessians, share_solved
from .errors import RecipeError
from .formats import CompressedWeight
from .hessian import HessianAccumulator, relative_error, relative_error_of_rows, report_denominator
from .matmul_precision import fast_matmul_is_accurate, matmul_precision
from .lazy import LazyBlocks
from .lockstep import lockstep_block
from .memory import available_memory, give_back_large_frees, trim_heap
from .upcast import restore_linears, upcast_per_call
from .linears import (
    describe_left_out, is_compressible, left_out_summary, left_out_weights, linear_shape, refuse_expert_tensors,
    set_weight_out_in, weight_out_in,
)
from .recipe import Recipe
from . import methods
from .solvers import MethodConfig, Solution
from .stacking import stack_runs

log = logging.getLogger(__name__)


class BlockWriter(Protocol):
    def write_block(self, index: int, compressed: dict[str, CompressedWeight], plain: dict[str, torch.Tensor]) -> None: ...


@dataclass
class LayerReport:
    name: str
    method: str
    rel_error: float  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the calibration inputs this layer saw
    seconds: float  # solver time (a stacked group's time shared out by rows)
    bits_per_weight: float  # packed payload bits / weights (codes, scales, LUTs, mask)
    damping: float | None
    sparsity: float
    notes: list[str] = field(default_factory=list)
    # "output": rel_error as above; "weight": |ΔW|² / |W|² (data-free recipe, no inputs streamed)
    error_space: str = "output"

    def to_dict(self) -> dict:
        """The manifest's form (the name is its key there)."""
        return {
            "method": self.method, "rel_error": self.rel_error, "error_space": self.error_space, "seconds": self.seconds,
            "bits_per_weight": self.bits_per_weight, "damping": self.damping, "sparsity": self.sparsity,
            "notes": self.notes,
        }


@dataclass
class CompressionResult:
    layers: list[LayerReport]
    compressed: dict[str, CompressedWeight]  # empty when the writer took ownership
    seconds: float  # capture + all blocks (no model load, no evaluation)
    left_out: dict = field(default_factory=dict)  # block weights kept in float16 and why (linears.left_out_summary)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise RecipeError(f"--device {device!r} is unknown; use cpu, cuda, mps or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise RecipeError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(device)


class LayerwiseCompressor:
    """Compress `model` in place, block by block, with the methods `recipe` assigns."""

    def __init__(self, model: nn.Module, recipe: Recipe, device: str = "auto", batch_size: int = 8, staged: bool = True,
                 sensitivity: dict[str, torch.Tensor] | None = None, lazy: LazyBlocks | None = None,
                 offload_dir: str | Path | None = None, stack: bool = True, lockstep: bool | str = "auto",
                 ranks: Ranks = SINGLE, fast_matmul: bool = True):
        """sensitivity: {layer name: [out, in]} for recipes with `sensitivity: fisher` (skm), e.g.
        from `layerwise.sensitivity.fisher_sensitivity(model, loss_fn, data)`.
        lazy: reads each block's weights when it is reached (`layerwise.lazy.open_lazy`); None: the
        blocks are in memory. offload_dir: keep the calibration activations memory-mapped there.
        stack: solve the layers of one input group with one config as one stacked matrix
        (stacking.py; same result). lockstep: staged solving of a declared family in one forward per
        block (lockstep.py; same result, every batch's block activations in memory at once; not with
        offload_dir); False: one forward per stage; "auto": lockstep when its extra activations fit
        (`_choose_lockstep`).
        ranks: this process's share of the batches and layers under torch.distributed (`distributed`).
        fast_matmul: float32 products through bfloat16 units where that keeps float32 accuracy on the
        device (`matmul_precision`; about twice as fast on CPUs with AVX512-BF16)."""
        self.ranks = ranks
        self.total_batches = 0  # calibration batches over all ranks (this rank holds its share)
        self.stack = stack
        self.lockstep = lockstep if offload_dir is None else False
        self.model = model
        self.lazy = lazy
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self.sensitivity = sensitivity or {}
        self.recipe = recipe
        self.device = resolve_device(device)
        self.fast_matmul = fast_matmul and fast_matmul_is_accurate(self.device)
        self.batch_size = batch_size
        self.staged = staged
        self.family: Family = resolve_family(model)
        self.blocks: nn.ModuleList = get_module(model, self.family.blocks)
        self.plan = self._plan()
        self.left_out = left_out_summary(left_out_weights(self.blocks, self.family.blocks, set(self.plan)), self.blocks)
        _warn_if_mostly_left_out(self.left_out, bool(self.plan))

    def _plan(self) -> dict[str, MethodConfig]:
        """Every layer's config, validated against its shape before any work starts."""
        plan = {}
        for i, block in enumerate(self.blocks):
            refuse_expert_tensors(block, f"{self.family.blocks}.{i}")
            for rel, module in block.named_modules():
                if is_compressible(module):
                    name = f"{self.family.blocks}.{i}.{rel}"
                    self._add(plan, name, module)
        if self.recipe.names_lm_head():
            head = get_module(self.model, self.family.lm_head)
            if getattr(self.model.config, "tie_word_embeddings", False):
                raise RecipeError("lm_head is tied to the input embeddings; it cannot be compressed on its own (remove the lm_head rule)")
            self._add(plan, self.family.lm_head, head)
        if not plan:
            log.warning("the recipe selects no layer: the checkpoint will be uncompressed")
        return plan

    def _add(self, plan, name, module):
        config = self.recipe.config_for(name)
        if config is not None:
            config.check_shape(*linear_shape(module), name)
            if methods.wants_sensitivities(config) and name not in self.sensitivity:
                raise RecipeError(
                    f"{name}: sensitivity: fisher needs per-weight sensitivities; pass LayerwiseCompressor(..., "
                    "sensitivity=layerwise.sensitivity.fisher_sensitivity(model, loss_fn, data)) or use "
                    "sensitivity: hessian_diag"
                )
            plan[name] = config

    @property
    def needs_data(self) -> bool:
        """Some layer's method needs its inputs (a Hessian); otherwise no calibration is streamed."""
        return any(config.needs_hessian for config in self.plan.values())

    @torch.no_grad()
    def compress(
        self,
        windows: torch.Tensor | None,
        writer: BlockWriter | None = None,
        on_block_output: Callable[[int, list[torch.Tensor]], None] | None = None,
    ) -> CompressionResult:
        """windows: [N, L] token ids (unused, may be None, for a data-free recipe). Returns the
        per-layer report (and the weights, without a writer).

        One loop for every recipe: with calibration batches each block is solved on its inputs and
        then forwarded to make the next block's; a data-free recipe skips both. A writer that has
        `blocks_done` > 0 (a resumed run) gets only the blocks after those; the calibration batches
        are streamed through the already-written compressed blocks to rebuild the next block's inputs.
        """
        with matmul_precision("medium") if self.fast_matmul else contextlib.nullcontext():
            return self._compress(windows, writer, on_block_output)

    def _compress(self, windows, writer, on_block_output) -> CompressionResult:
        start = time.perf_counter()
        self.model.eval()
        if self.offload_dir is not None:  # the low-memory mode: one block's temporaries at a time, not
            give_back_large_frees()  # every block's fragments (an mmap per large temporary: ~20 % more CPU)
        trim_heap()  # what reading the model and tokenizing the calibration text left in the heaps
        streamed = self.needs_data or on_block_output is not None
        if windows is None and streamed:
            raise RecipeError("this recipe needs calibration data (a method solves with a Hessian); pass windows")
        done = getattr(writer, "blocks_done", 0)
        reports: list[LayerReport] = []
        kept: dict[str, CompressedWeight] = {}
        batches = None
        try:
            if streamed:
                with self._outside_on_device(head=False):  # only for the capture: float32 embeddings are big
                    batches = self._capture(windows)
            if self.lazy is not None:
                self.lazy.release_outside()  # read again for the lm_head and the checkpoint
            self._log_memory_estimate(windows, batches)
            if batches is not None:
                self._choose_lockstep(batches)
            todo = range(len(self.blocks)) if streamed else range(min(done, len(self.blocks)), len(self.blocks))
            desc = "compressing blocks" if streamed else "compressing blocks (data-free)"
            for index in tqdm(todo, desc=desc, unit="block", disable=None if self.ranks.main else True):
                self._process_block(index, index < done, batches, reports, writer, kept, on_block_output)
            if self.lazy is not None:
                self.lazy.load_outside()
            if self.family.lm_head in self.plan and done <= len(self.blocks):
                with self._outside_on_device():
                    head = get_module(self.model, self.family.lm_head)
                    hessian = self._lm_head_hessian(batches) if streamed else None
                    cw = self._solve(self.family.lm_head, head, hessian, reports)
                self._hand_over_head(cw, writer, kept, reports)
        finally:
            if batches is not None:
                batches.close()
        return CompressionResult(reports, kept, time.perf_counter() - start, self.left_out)

    @contextlib.contextmanager
    def _outside_on_device(self, head: bool = True):
        """The tensors outside the blocks on the device in float32, given back (`dtypes.kept_dtype`) after.
        head=False leaves the final norm and lm_head as they are: the capture stops before them
        (an untied lm_head in float32 is as big as the embeddings)."""
        after = () if head else tuple(p + "." for p in (self.family.final_norm, self.family.lm_head) if p)
        skip = (self.family.blocks + ".",) + after
        stored = _move_outside(self.model, skip, self.device)
        try:
            yield
        finally:
            _move_outside(self.model, skip, torch.device("cpu"), stored)

    def _process_block(self, index, replay, batches, reports, writer, kept, on_block_output) -> None:
        """Onload block `index`, solve it (or, `replay`, put back its written compressed weights), make
        the next block's inputs, offload it and hand it to the writer."""
        block = self.blocks[index]
        if self.lazy is not None:
            self.lazy.load(index, block)
        keep_dtype, upcast = _onload(block, self.device)
        outputs = None
        if replay:
            compressed = writer.read_block(index)
            for name, cw in compressed.items():
                _put_dense(get_module(self.model, name), cw)
        elif batches is not None:
            compressed, outputs = self._compress_block(index, block, batches, reports)
        else:
            compressed = self._solve_linears({name: module for rel, module in block.named_modules()
                                              if (name := self._name(index, rel)) in self.plan}, None, reports)
        if batches is not None:  # the next block sees this block's compressed outputs
            if outputs is None:
                batches.advance(lambda batch: run_block(block, batch, index))
            else:  # the lockstep forward made them already
                ready = iter(outputs)
                batches.advance(lambda batch: next(ready))
            if on_block_output is not None:
                on_block_output(index, batches.hidden_states())
        block.to(device="cpu", dtype=keep_dtype)
        restore_linears(upcast)
        if not replay:
            self._hand_over(index, block, compressed, writer, kept, reports)
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

    def _choose_lockstep(self, batches: Activations) -> None:
        """"auto": lockstep when its extra memory fits comfortably. Every batch then waits inside the
        block at once, each holding about its widest linear input (the MLP intermediate) and two
        hidden-wide tensors per token in float32, on top of the widest group's solve. Allowed: a
        quarter of the memory available now. Otherwise the staged path, which gives the same bytes
        with one forward per stage (about 2.6 block forwards instead of one: issue 15's speed)."""
        if self.lockstep != "auto":
            return
        block = self.blocks[0]
        widths = [linear_shape(m)[1] for m in block.modules() if is_compressible(m)]
        hidden = batches.hidden_width()
        extra = 4 * batches.tokens() * (max(widths, default=hidden) + 2 * hidden)
        have = available_memory()
        self.lockstep = have is None or 4 * extra <= have
        log.info("lockstep solving %s: every batch paused inside a block holds about %.0f MB%s",
                 "on" if self.lockstep else "off, one forward per stage (same result)", extra / 1e6,
                 f" (allowed: a quarter of {have / 1e6:.0f} MB available)" if have else "")

    def _compress_block(self, index, block, batches, reports) -> tuple[dict[str, CompressedWeight], list | None]:
        """The block's compressed layers, and its compressed outputs per batch when the lockstep
        forward already produced them (None: the caller runs the block again)."""
        if self.staged and self.lockstep and self.family.groups is not None:
            return self._compress_block_lockstep(index, block, batches, reports)
        groups = self.family.groups or discover_groups(block, index, batches[0])
        stages = [[g] for g in groups] if self.staged else [list(groups)]
        compressed = {}
        for stage in stages:
            todo = [g for g in stage if any(self._name(index, n) in self.plan for n in g)]
            if not todo:
                continue
            hessians = collect_hessians(block, index, [g[0] for g in todo], batches,
                                       stop_early=self.family.groups is not None, ranks=self.ranks,
                                       total=self.total_batches, park_dir=self.offload_dir)
            for group in todo:
                compressed.update(self._solve_group(index, block, group, hessians[group[0]], reports))
        return compressed, None

    def _compress_block_lockstep(self, index, block, batches, reports):
        groups = {g[0]: g for g in self.family.groups if any(self._name(index, n) in self.plan for n in g)}
        compressed = {}

        def solve(leader, hessian):
            compressed.update(self._solve_group(index, block, groups[leader], hessian, reports))

        outputs = lockstep_block(block, index, batches, list(groups), solve, self.ranks, self.total_batches)
        return compressed, outputs

    def _solve_group(self, index, block, group, hessian, reports) -> dict[str, CompressedWeight]:
        """Solve the planned layers of one input group (stacked where stack_runs allows)."""
        linears = {name: block.get_submodule(rel) for rel in group if (name := self._name(index, rel)) in self.plan}
        return self._solve_linears(linears, hessian, reports)

    def _solve(self, name: str, linear: nn.Module, hessian: torch.Tensor | None, reports: list) -> CompressedWeight:
        """linear: nn.Linear or Conv1D; hessian None: data-free (the report's error is then in weight space)."""
        return self._solve_linears({name: linear}, hessian, reports)[name]

    def _solve_linears(self, linears: dict[str, nn.Module], hessian, reports) -> dict[str, CompressedWeight]:
        """Solve layers sharing one input (stacked where stack_runs allows); reports in their order.
        The runs are dealt round-robin over the ranks and every rank takes every solution, so the
        weights and reports do not depend on the world size.

        When every run's solver can consume the Hessian (`methods.Method.consumes_hessian`: its solutions carry
        `row_errors`), the last run factors H in its own buffer — one [in, in] less at the widest
        solve — and the reports' denominators tr(W H Wᵀ) are taken before."""
        trim_heap()  # the forwards' freed temporaries, kept by malloc in its arenas, before the widest work
        runs = stack_runs(list(linears), self.plan, self.stack)
        consume = hessian is not None and all(methods.method(self.plan[run[0]].method).consumes_hessian for run in runs)
        scales = {n: report_denominator(weight_out_in(m), hessian) for n, m in linears.items()} if consume else {}
        mine = {j: self._solve_run(run, linears, hessian, consume and j == len(runs) - 1)
                for j, run in enumerate(runs) if self.ranks.solves(j)}
        solved = {}
        if self.ranks.world == 1:
            for result in mine.values():
                solved.update(result)
        else:
            packed = {j: {n: (portable(s.compressed), s.damping, s.notes, s.row_errors, sec) for n, (s, sec) in r.items()}
                      for j, r in mine.items()}
            for result in share_solved(self.ranks, packed, len(runs)):
                solved.update({n: (Solution(CompressedWeight.from_tensors(*cw), damping, notes, row_errors), sec)
                               for n, (cw, damping, notes, row_errors, sec) in result.items()})
        return {name: self._record(name, linears[name], hessian, *solved[name], reports, scales.get(name))
                for name in linears}

    def _solve_run(self, run: list[str], linears, hessian, consume: bool = False) -> dict:
        """{name: (Solution, seconds)}; a stacked run's solver time is shared out by rows.
        consume: the solver may factor `hessian` in place (it is not used after)."""
        config = self.plan[run[0]]
        weights = [weight_out_in(linears[n]) for n in run]  # [out, in]
        sensitivities = [self.sensitivity[n] for n in run] if methods.wants_sensitivities(config) else None
        t0 = time.perf_counter()
        solutions = methods.solve_group(config, weights, hessian, consume_hessian=consume, sensitivities=sensitivities)
        seconds = time.perf_counter() - t0
        rows = [w.shape[0] for w in weights]
        return {n: (s, seconds * r / sum(rows)) for n, s, r in zip(run, solutions, rows)}

    def _record(self, name, linear, hessian, solution, seconds, reports, scale=None) -> CompressedWeight:
        """Report the layer's solution and put its dense view into the model (later stages see it).
        scale: the report's denominator tr(W H Wᵀ), taken before a solver consumed `hessian`."""
        config = self.plan[name]
        weight = weight_out_in(linear)  # [out, in]
        cw = solution.compressed
        if hessian is not None and solution.row_errors is not None:
            scale = report_denominator(weight, hessian) if scale is None else scale
            rel_error = relative_error_of_rows(solution.row_errors, scale)
        else:
            dense = cw.dequantize().to(device=weight.device, dtype=torch.float32)
            rel_error = relative_error(weight, dense, hessian)
            del dense
        reports.append(
            LayerReport(
                name=name,
                method=config.method,
                rel_error=rel_error,
                error_space="output" if hessian is not None else "weight",
                seconds=seconds,
                bits_per_weight=cw.bits_per_weight(),
                damping=solution.damping,
                sparsity=1 - cw.kept / cw.numel,
                notes=solution.notes,
            )
        )
        _put_dense(linear, cw)
        return cw

    def _lm_head_hessian(self, batches) -> torch.Tensor:
        norm = get_module(self.model, self.family.final_norm)
        head = get_module(self.model, self.family.lm_head)

        def blank():
            return {"head": HessianAccumulator(head.in_features, self.device)}

        def leaves():
            for batch in batches:
                leaf = blank()
                leaf["head"].add(norm(batch.hidden))
                yield leaf

        return reduce_hessians(self.ranks, leaves(), self.total_batches, blank)["head"].take_hessian()

    def _hand_over_head(self, cw, writer, kept, reports):
        if writer is not None:
            writer.write_block(len(self.blocks), {self.family.lm_head: cw}, {}, _reports_of(reports, [self.family.lm_head]))
        else:
            kept[self.family.lm_head] = cw

    def _hand_over(self, index, block, compressed, writer, kept, reports):
        if writer is None:
            kept.update(compressed)
            return
        plain = {}
        for rel, tensor in block.state_dict().items():
            name = self._name(index, rel)
            if name.removesuffix(".weight") not in compressed:
                plain[name] = tensor
        writer.write_block(index, compressed, plain, _reports_of(reports, compressed))

    def _name(self, index: int, rel: str) -> str:
        return f"{self.family.blocks}.{index}.{rel}"


def _reports_of(reports: list[LayerReport], names) -> dict[str, dict]:
    """The manifest entries of the layers `names` (the block just handed over)."""
    names = set(names)
    return {r.name: r.to_dict() for r in reports if r.name in names}


def _warn_if_mostly_left_out(left_out: dict, planned: bool) -> None:
    if planned and left_out["parameters"] * 2 > left_out["block_parameters"]:
        log.warning("most block weights stay float16: %s", describe_left_out(left_out))


def _onload(block: nn.Module, device: torch.device) -> tuple[torch.dtype, list[nn.Linear]]:
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


def _put_dense(linear: nn.Module, cw: CompressedWeight) -> None:
    """The compressed weight's dense values into `linear` (later stages and blocks see them), in the
    dtype it stores its weight in (float16 values: exact in float16 and float32)."""
    weight = linear.weight
    set_weight_out_in(linear, cw.dequantize().to(device=weight.device, dtype=weight.dtype))


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


def _move_outside(
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
