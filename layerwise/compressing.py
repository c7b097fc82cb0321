"""Compressing a group of layers that share one input: solve, report, put the dense view back.

`Compressing` is the block walker's group solver for a compression run (`engine.GroupSolver`):
each layer is solved with its planned config through the method registry, stacked where the
method allows (`stacking.stack_runs`), its error reported (`LayerReport`), and its dequantized
weight put into the model so that later stages and blocks see the compression error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from . import magr, methods
from .distributed import SINGLE, Ranks, portable, share_solved
from .float_targets import DEFAULT_ALPHA, damp_of, float_targets
from .formats import CompressedWeight
from .hessian import relative_error, relative_error_of_rows, report_denominator
from .linears import put_dense, weight_out_in
from .memory import trim_heap
from .solvers import MethodConfig, Solution
from .stacking import stack_runs


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


class Compressing:
    """Solve each planned layer with its config and keep its report (`reports`, in solving order).

    plan: {layer name: config} (`plan.plan_layers`). sensitivity: {layer name: [out, in]} for the
    methods that want caller-given sensitivities. stack: solve equal configs of one input group as
    one stacked matrix (same result). ranks: the runs of a group are dealt round-robin over the
    ranks and every rank takes every solution, so weights and reports do not depend on the world size.
    float_alpha: the fraction of the step towards the float fit taken for a group with a cross term.
    magr: shrink each grid-quantized layer's weight range first (`magr.py`); it is still reported
    against its own target."""

    def __init__(self, plan: dict[str, MethodConfig], sensitivity: dict[str, torch.Tensor] | None = None,
                 stack: bool = True, ranks: Ranks = SINGLE, float_alpha: float = DEFAULT_ALPHA, magr: bool = False):
        self.float_alpha = float_alpha
        self.magr = magr
        self.plan = plan
        self.sensitivity = sensitivity or {}
        self.stack = stack
        self.ranks = ranks
        self.reports: list[LayerReport] = []

    @property
    def layers(self) -> dict[str, MethodConfig]:
        return self.plan

    @property
    def needs_data(self) -> bool:
        """Some layer's method needs its inputs (a Hessian); otherwise no calibration is streamed."""
        return any(config.needs_hessian for config in self.plan.values())

    def reports_of(self, names: Iterable[str]) -> dict[str, dict]:
        """The manifest entries of the layers `names` (a block handed to the sink)."""
        names = set(names)
        return {r.name: r.to_dict() for r in self.reports if r.name in names}

    def solve_group(self, linears: dict[str, nn.Module], hessian: torch.Tensor | None,
                    cross: torch.Tensor | None = None) -> dict[str, CompressedWeight]:
        """Layers sharing one input (nn.Linear or Conv1D; hessian [in, in] float32, or None: data-free,
        the report's error is then in weight space), reported in their order.

        cross: [in, in] float32 cross term D of `--targets float`: each layer with a Hessian method
        is then solved and reported against its float target W* (`float_targets`) instead of W.

        When every run's method consumes the Hessian (`methods.Method.consumes_hessian`: its
        solutions carry `row_errors`), the last run factors H in its own buffer — one [in, in] less
        at the widest solve — and the reports' denominators tr(W H Wᵀ) are taken before."""
        trim_heap()  # the forwards' freed temporaries, kept by malloc in its arenas, before the widest work
        runs = stack_runs(list(linears), self.plan, self.stack)
        targets, notes = self._targets(runs, linears, hessian, cross)
        solve_on = self._reduced(runs, targets, hessian, notes) if self.magr else targets
        # the solver's own row errors are against what it solved: with MagR the report is against the target
        consume = (hessian is not None and solve_on is targets
                   and all(methods.method(self.plan[run[0]].method).consumes_hessian for run in runs))
        scales = {n: report_denominator(targets[n], hessian) for n in linears} if consume else {}
        mine = {j: self._solve_run(run, solve_on, hessian, consume and j == len(runs) - 1)
                for j, run in enumerate(runs) if self.ranks.solves(j)}
        solved = self._gather(mine, len(runs))
        return {name: self._record(name, linears[name], targets[name], hessian, *solved[name], scales.get(name),
                                   notes.get(name, []), solve_on[name] is targets[name])
                for name in linears}

    def _targets(self, runs, linears, hessian, cross) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """{name: the [out, in] weight each layer is fitted to}: its own, or with a cross term and a
        Hessian method its float target W*; and the notes computing W* left, by name."""
        targets = {n: weight_out_in(m) for n, m in linears.items()}
        notes: dict[str, list[str]] = {}
        if cross is None or hessian is None:
            return targets, notes
        for run in runs:
            config = self.plan[run[0]]
            if not config.needs_hessian:
                continue
            fitted, moved, retries = float_targets([targets[n] for n in run], hessian, cross, damp_of(config),
                                                    self.float_alpha)
            for name, target, distance in zip(run, fitted, moved):
                targets[name] = target
                notes[name] = retries + [f"float target (alpha {self.float_alpha:g}): |T - W| / |W| = {distance:.3g}"]
        return targets, notes

    def _reduced(self, runs, targets, hessian, notes) -> dict[str, torch.Tensor]:
        """The weights the solver is handed under MagR: each grid-quantized layer's target with its
        range reduced (`magr.reduce_magnitude`), the others' targets as they are."""
        solve_on = dict(targets)
        if hessian is None:
            return solve_on
        for run in runs:
            config = self.plan[run[0]]
            if not magr.applies_to(config):
                continue
            reduced = magr.reduce_magnitudes([targets[name] for name in run], hessian, config.block_size)
            for name, after in zip(run, reduced):
                solve_on[name] = after
                notes.setdefault(name, []).append(
                    f"magr: max |W| {float(targets[name].abs().max()):.4g} -> {float(after.abs().max()):.4g}")
        return solve_on

    def _gather(self, mine: dict[int, dict], n_runs: int) -> dict[str, tuple[Solution, float]]:
        """Every run's {name: (Solution, seconds)}, this rank's and the others' (`distributed.share_solved`)."""
        solved = {}
        if self.ranks.world == 1:
            for result in mine.values():
                solved.update(result)
            return solved
        packed = {j: {n: (portable(s.compressed), s.damping, s.notes, s.row_errors, sec) for n, (s, sec) in r.items()}
                  for j, r in mine.items()}
        for result in share_solved(self.ranks, packed, n_runs):
            solved.update({n: (Solution(CompressedWeight.from_tensors(*cw), damping, notes, row_errors), sec)
                           for n, (cw, damping, notes, row_errors, sec) in result.items()})
        return solved

    def _solve_run(self, run: list[str], targets: dict[str, torch.Tensor], hessian, consume: bool = False) -> dict:
        """{name: (Solution, seconds)}; a stacked run's solver time is shared out by rows.
        targets: the [out, in] weight of each layer to fit. consume: the solver may factor `hessian`
        in place (it is not used after)."""
        config = self.plan[run[0]]
        weights = [targets[n] for n in run]  # [out, in]
        sensitivities = [self.sensitivity[n] for n in run] if methods.wants_sensitivities(config) else None
        t0 = time.perf_counter()
        solutions = methods.solve_group(config, weights, hessian, consume_hessian=consume, sensitivities=sensitivities)
        seconds = time.perf_counter() - t0
        rows = [w.shape[0] for w in weights]
        return {n: (s, seconds * r / sum(rows)) for n, s, r in zip(run, solutions, rows)}

    def _record(self, name, linear, weight, hessian, solution, seconds, scale=None, notes=(),
                solved_the_target: bool = True) -> CompressedWeight:
        """Report the layer's solution and put its dense view into the model (later stages see it).
        weight: the [out, in] target it was fitted to. scale: the report's denominator tr(W H Wᵀ),
        taken before a solver consumed `hessian`. notes: computing the target's, before the solver's.
        solved_the_target: False when the solver was handed another weight (MagR's): its row errors
        do not measure the error against `weight`."""
        cw = solution.compressed
        if hessian is not None and solution.row_errors is not None and solved_the_target:
            scale = report_denominator(weight, hessian) if scale is None else scale
            rel_error = relative_error_of_rows(solution.row_errors, scale)
        else:
            dense = cw.dequantize().to(device=weight.device, dtype=torch.float32)
            rel_error = relative_error(weight, dense, hessian)
            del dense
        self.reports.append(LayerReport(
            name=name, method=self.plan[name].method, rel_error=rel_error,
            error_space="output" if hessian is not None else "weight", seconds=seconds,
            bits_per_weight=cw.bits_per_weight(), damping=solution.damping, sparsity=1 - cw.kept / cw.numel,
            notes=list(notes) + solution.notes,
        ))
        put_dense(linear, cw)
        return cw
