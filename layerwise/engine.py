"""LayerwiseCompressor: stream calibration batches through the model one block at a time.

For each block: onload it, collect one Hessian per group of linears sharing an input (stage by
stage by default, so later stages see the earlier stages' error), solve each linear, forward again
with the compressed weights to produce the next block's inputs, hand the block to the writer, offload.

A recipe whose every method is data-free (RTN, magnitude, k-means) streams nothing: each block's
linears are solved from their weights alone, and the report's error is measured in weight space.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from layerwise.models.families import Family, get_module, resolve_family

from .capture import BlockInput, StopForward, capture_block_inputs, run_block
from .errors import RecipeError
from .formats import CompressedWeight
from .hessian import HessianAccumulator, relative_error
from .lockstep import lockstep_block
from .recipe import Recipe
from .solvers import GROUP_SOLVERS, METHODS, MethodConfig
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


@dataclass
class CompressionResult:
    layers: list[LayerReport]
    compressed: dict[str, CompressedWeight]  # empty when the writer took ownership
    seconds: float  # capture + all blocks (no model load, no evaluation)


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
                 sensitivity: dict[str, torch.Tensor] | None = None, stack: bool = True, lockstep: bool = True):
        """sensitivity: {layer name: [out, in]} for recipes with `sensitivity: fisher` (skm), e.g.
        from `layerwise.sensitivity.fisher_sensitivity(model, loss_fn, data)`. stack: solve the
        layers of one input group with one config as one stacked matrix (stacking.py; same result).
        lockstep: staged solving of a declared family in one forward per block (lockstep.py; same
        result, every batch's block activations in memory at once); off: one forward per stage."""
        self.stack = stack
        self.lockstep = lockstep
        self.model = model
        self.sensitivity = sensitivity or {}
        self.recipe = recipe
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.staged = staged
        self.family: Family = resolve_family(model)
        self.blocks: nn.ModuleList = get_module(model, self.family.blocks)
        self.plan = self._plan()

    def _plan(self) -> dict[str, MethodConfig]:
        """Every layer's config, validated against its shape before any work starts."""
        plan = {}
        for i, block in enumerate(self.blocks):
            for rel, module in block.named_modules():
                if isinstance(module, nn.Linear):
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
            config.check_shape(module.out_features, module.in_features, name)
            if _wants_fisher(config) and name not in self.sensitivity:
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
        per-layer report (and the weights, without a writer)."""
        start = time.perf_counter()
        self.model.eval()
        data_free = not self.needs_data and on_block_output is None
        if windows is None and not data_free:
            raise RecipeError("this recipe needs calibration data (a method solves with a Hessian); pass windows")
        prefix = self.family.blocks + "."
        stored = _move_outside(self.model, prefix, self.device)
        if data_free:
            result = self._compress_data_free(writer, start)
            _move_outside(self.model, prefix, torch.device("cpu"), stored)
            return result
        batches = capture_block_inputs(self.model, self.blocks[0], windows, self.batch_size, self.device)
        reports: list[LayerReport] = []
        kept: dict[str, CompressedWeight] = {}
        for index in tqdm(range(len(self.blocks)), desc="compressing blocks", unit="block", disable=None):
            block = self.blocks[index]
            keep_dtype = _onload(block, self.device)
            compressed, outputs = self._compress_block(index, block, batches, reports)
            for i, batch in enumerate(batches):  # the next block sees this block's compressed outputs
                batch.hidden = run_block(block, batch) if outputs is None else outputs[i]
            if on_block_output is not None:
                on_block_output(index, [b.hidden for b in batches])
            block.to(device="cpu", dtype=keep_dtype)
            self._hand_over(index, block, compressed, writer, kept)
        if self.family.lm_head in self.plan:
            self._hand_over_head(self._compress_lm_head(batches, reports), writer, kept)
        _move_outside(self.model, prefix, torch.device("cpu"), stored)
        return CompressionResult(reports, kept, time.perf_counter() - start)

    def _compress_data_free(self, writer, start) -> CompressionResult:
        reports: list[LayerReport] = []
        kept: dict[str, CompressedWeight] = {}
        for index in tqdm(range(len(self.blocks)), desc="compressing blocks (data-free)", unit="block", disable=None):
            block = self.blocks[index]
            keep_dtype = _onload(block, self.device)
            compressed = {}
            for rel, module in block.named_modules():
                name = self._name(index, rel)
                if name in self.plan:
                    compressed[name] = self._solve(name, module, None, reports)
            block.to(device="cpu", dtype=keep_dtype)
            self._hand_over(index, block, compressed, writer, kept)
        if self.family.lm_head in self.plan:
            head = get_module(self.model, self.family.lm_head)
            self._hand_over_head(self._solve(self.family.lm_head, head, None, reports), writer, kept)
        return CompressionResult(reports, kept, time.perf_counter() - start)

    def _compress_block(self, index, block, batches, reports) -> tuple[dict[str, CompressedWeight], list | None]:
        """The block's compressed layers, and its compressed outputs per batch when the lockstep
        forward already produced them (None: the caller runs the block again)."""
        if self.staged and self.lockstep and self.family.groups is not None:
            return self._compress_block_lockstep(index, block, batches, reports)
        groups = self.family.groups or discover_groups(block, batches[0])
        stages = [[g] for g in groups] if self.staged else [list(groups)]
        compressed = {}
        for stage in stages:
            todo = [g for g in stage if any(self._name(index, n) in self.plan for n in g)]
            if not todo:
                continue
            hessians = collect_hessians(block, [g[0] for g in todo], batches, stop_early=self.family.groups is not None)
            for group in todo:
                linears = {self._name(index, rel): block.get_submodule(rel) for rel in group}
                compressed.update(self._solve_group({n: m for n, m in linears.items() if n in self.plan},
                                                    hessians[group[0]], reports))
        return compressed, None

    def _compress_block_lockstep(self, index, block, batches, reports):
        groups = {g[0]: g for g in self.family.groups if any(self._name(index, n) in self.plan for n in g)}
        compressed = {}

        def solve(leader, hessian):
            linears = {self._name(index, rel): block.get_submodule(rel) for rel in groups[leader]}
            compressed.update(self._solve_group({n: m for n, m in linears.items() if n in self.plan}, hessian, reports))

        outputs = lockstep_block(block, batches, list(groups), solve)
        return compressed, outputs

    def _solve(self, name: str, linear: nn.Linear, hessian: torch.Tensor | None, reports: list) -> CompressedWeight:
        """hessian None: data-free (the report's error is then in weight space)."""
        return self._solve_group({name: linear}, hessian, reports)[name]

    def _solve_group(self, linears: dict[str, nn.Linear], hessian, reports) -> dict[str, CompressedWeight]:
        """Solve layers sharing one input (stacked where stack_runs allows); reports in their order."""
        solved = {}
        for run in stack_runs(list(linears), self.plan, self.stack):
            solved.update(self._solve_run(run, linears, hessian))
        return {name: self._record(name, linears[name], hessian, *solved[name], reports) for name in linears}

    def _solve_run(self, run: list[str], linears, hessian) -> dict:
        """{name: (Solution, seconds)}; a stacked run's solver time is shared out by rows."""
        config = self.plan[run[0]]
        fisher = _wants_fisher(config)
        hessian = hessian if config.needs_hessian else None
        t0 = time.perf_counter()
        if len(run) > 1:
            extra = {"sensitivities": [self.sensitivity[n] for n in run]} if fisher else {}
            solutions = GROUP_SOLVERS[config.method]([linears[n].weight.data for n in run], hessian, config, **extra)
        else:
            extra = {"sensitivity": self.sensitivity[run[0]]} if fisher else {}
            solutions = [METHODS[config.method][1](linears[run[0]].weight.data, hessian, config, **extra)]
        seconds = time.perf_counter() - t0
        rows = [linears[n].out_features for n in run]
        return {n: (s, seconds * r / sum(rows)) for n, s, r in zip(run, solutions, rows)}

    def _record(self, name, linear, hessian, solution, seconds, reports) -> CompressedWeight:
        """Report the layer's solution and put its dense view into the model (later stages see it)."""
        config = self.plan[name]
        weight = linear.weight.data
        cw = solution.compressed
        dense = cw.dequantize().to(device=weight.device, dtype=torch.float32)
        reports.append(
            LayerReport(
                name=name,
                method=config.method,
                rel_error=relative_error(weight, dense, hessian),
                error_space="output" if hessian is not None else "weight",
                seconds=seconds,
                bits_per_weight=cw.bits_per_weight(),
                damping=solution.damping,
                sparsity=1 - cw.kept / cw.numel,
                notes=solution.notes,
            )
        )
        linear.weight.data = dense
        return cw

    def _compress_lm_head(self, batches, reports) -> CompressedWeight:
        norm = get_module(self.model, self.family.final_norm)
        head = get_module(self.model, self.family.lm_head)
        acc = HessianAccumulator(head.in_features, self.device)
        for batch in batches:
            acc.add(norm(batch.hidden))
        return self._solve(self.family.lm_head, head, acc.hessian, reports)

    def _hand_over_head(self, cw, writer, kept):
        if writer is not None:
            writer.write_block(len(self.blocks), {self.family.lm_head: cw}, {})
        else:
            kept[self.family.lm_head] = cw

    def _hand_over(self, index, block, compressed, writer, kept):
        if writer is None:
            kept.update(compressed)
            return
        plain = {}
        for rel, tensor in block.state_dict().items():
            name = self._name(index, rel)
            if name.removesuffix(".weight") not in compressed:
                plain[name] = tensor
        writer.write_block(index, compressed, plain)

    def _name(self, index: int, rel: str) -> str:
        return f"{self.family.blocks}.{index}.{rel}"


def _onload(block: nn.Module, device: torch.device) -> torch.dtype:
    """Move `block` to `device` in float32; returns the dtype to store it in afterwards (bfloat16
    comes back as float32: the compressed float16 values are not bfloat16-exact)."""
    dtype = next(block.parameters()).dtype
    block.to(device=device, dtype=torch.float32)
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _wants_fisher(config: MethodConfig) -> bool:
    """Whether the layer's solver takes caller-given sensitivities (skm with sensitivity: fisher)."""
    return getattr(config, "sensitivity", None) == "fisher"


def collect_hessians(
    block: nn.Module, names: list[str], batches: list[BlockInput], stop_early: bool = True
) -> dict[str, torch.Tensor]:
    """Run every batch through `block`, accumulating H of each named linear's input.

    With `stop_early` the forward is cut as soon as every named linear has seen its input: the
    rest of the block cannot change these Hessians, and skipping it makes staged solving cheap
    (the q/k/v stage costs one norm, the o stage stops before o_proj, …). Only safe when each
    linear runs once per forward, which the declared families guarantee.
    """
    accs, handles = {}, []
    pending: set[str] = set()

    def grab(name, acc, x):
        acc.add(x)
        pending.discard(name)
        if stop_early and not pending:
            raise StopForward

    for name in names:
        linear = block.get_submodule(name)
        accs[name] = acc = HessianAccumulator(linear.in_features, linear.weight.device)
        handles.append(linear.register_forward_pre_hook(lambda m, inp, name=name, acc=acc: grab(name, acc, inp[0])))
    try:
        for batch in batches:
            pending.update(names)
            try:
                run_block(block, batch)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return {name: acc.hessian for name, acc in accs.items()}


def discover_groups(block: nn.Module, batch: BlockInput) -> tuple[tuple[str, ...], ...]:
    """Linears grouped by the input tensor they share, in execution order (generic fallback)."""
    seen: dict[tuple, list[str]] = {}
    handles = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            def hook(m, inp, out, name=name):
                x = inp[0]
                seen.setdefault((x.data_ptr(), tuple(x.shape)), []).append(name)
            handles.append(module.register_forward_hook(hook))
    try:
        run_block(block, batch)
    finally:
        for h in handles:
            h.remove()
    return tuple(tuple(names) for names in seen.values())


def _move_outside(
    model: nn.Module, block_prefix: str, device: torch.device, dtypes: dict[str, torch.dtype] | None = None
) -> dict[str, torch.dtype]:
    """Move every parameter and buffer outside the blocks to `device` (tied ones once), as float32,
    or back to the `dtypes` returned by the first call; returns the dtypes found."""
    found = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(block_prefix):
            continue
        found[name] = tensor.dtype
        dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
        if dtypes is not None and dtypes.get(name, dtype) != torch.bfloat16:  # fp16 codes are not bf16-exact
            dtype = dtypes.get(name, dtype)
        tensor.data = tensor.data.to(device=device, dtype=dtype)
    return found
