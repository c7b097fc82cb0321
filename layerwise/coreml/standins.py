"""Convert a model without ever holding a dense copy of its big weights.

Tracing and coremltools' passes need every weight's shape, not its values: the values come back
at the end as the checkpoint's own constexpr ops or float16 consts (`weights.swap_stand_ins`).
So while exporting, each 2-D+ weight is

    in torch:  float32 zeros in pages never written (`memory.placeholder`: no resident memory);
    in MIL:    as the first pass of the pipeline (`layerwise::stand_in_weights`), its frontend
               const is replaced by a stand-in ``constexpr_lut_to_dense`` whose LUT entries are
               whole rows (uint1 indices [..., 1], a [.., 2, columns] LUT that numbers the weight),
               tiny next to the weight → cast to float32.

A constexpr's value is never materialized by the passes (const folding, deduplication, the float16
cast), and the float16 pass's cast next to ours folds away (``cast_optimization``), so the stand-in
ends up wired exactly where the float16 const of the weight used to be. Without this, conversion
held a float32 copy of the model, a float32 numpy const per weight and then a float16 one.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.helper import block_context_manager
from coremltools.converters.mil.mil.passes.pass_registry import register_pass

from ..memory import placeholder

log = logging.getLogger(__name__)

PASS = "layerwise::stand_in_weights"
LUT_NUMBERS = 2048  # consecutive integers exact in float16; a stand-in's LUT holds (i % 2048, i // 2048)


def held_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name → tensor for every floating parameter of rank ≥ 2 (every tied name listed)."""
    return {name: p for name, p in model.named_parameters(remove_duplicate=False)
            if p.is_floating_point() and p.ndim >= 2}


@dataclass
class StandIns:
    """The weights a conversion stands in for, and the stand-ins it made (per MIL function)."""

    names: set[str]  # parameter names, as the torch frontend names their consts
    made: dict[str, str] = field(default_factory=dict)  # stand-in op name → parameter name
    count: int = 0  # stand-ins made so far, all functions: each gets its own number

    def next_number(self) -> int:
        self.count += 1
        return self.count - 1


_ACTIVE: list[StandIns] = []  # the conversion in progress (a graph pass takes no arguments)


@contextlib.contextmanager
def standing_in(model: torch.nn.Module, held: dict[str, torch.Tensor]):
    """Trace-ready model: `held` parameters as float32 placeholders, every other floating
    tensor as a CPU float32 copy (small: norms, biases, rotary buffers); restored afterwards."""
    saved = []
    held_ids = {id(t) for t in held.values()}
    try:
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) in held_ids:
                new = placeholder(t.shape)
            elif t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32):
                new = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)
            else:
                continue
            saved.append((t, t.data))
            t.data = new
        yield
    finally:
        for t, data in reversed(saved):
            t.data = data


@contextlib.contextmanager
def converting(stand_ins: StandIns):
    """Make `stand_ins` the one the registered pass fills during the conversion inside."""
    _ACTIVE.append(stand_ins)
    try:
        yield
    finally:
        _ACTIVE.remove(stand_ins)


def pipeline():
    """coremltools' default pipeline with the stand-in pass first."""
    import coremltools as ct

    p = ct.PassPipeline.DEFAULT
    p.insert_pass(0, PASS)
    return p


@register_pass(namespace="layerwise")
class stand_in_weights(AbstractGraphPass):
    """Replace each held weight's const (named after its parameter) by a stand-in constexpr → cast."""

    def apply(self, prog):
        if not _ACTIVE:
            raise RuntimeError(f"{PASS} runs only inside standins.converting()")
        stand_ins = _ACTIVE[-1]
        for fn in prog.functions.values():
            self._block(fn, stand_ins)

    @block_context_manager
    def _block(self, block, stand_ins: StandIns):
        for op in list(block.operations):
            if op.op_type != "const" or op.name not in stand_ins.names:
                continue
            shape = op.outputs[0].shape
            # one LUT entry is a whole row (vector_axis = last): the indices are [..., 1], the LUT
            # [1, .., 2, last] holds this stand-in's number, distinct so deduplication merges none
            lut = np.zeros((1,) * len(shape) + (2, shape[-1]), np.float16)
            i = stand_ins.next_number()
            lut.reshape(-1)[:2] = i % LUT_NUMBERS, i // LUT_NUMBERS
            new = mb.constexpr_lut_to_dense(
                indices=np.zeros(shape[:-1] + (1,), types.nptype_from_builtin(types.uint1)),
                lut=lut, vector_axis=len(shape) - 1, name=op.name + "_stand_in", before_op=op,
            )
            stand_ins.made[new.op.name] = op.name
            # named: an unnamed op would take a number from the counter that names coremltools' own casts
            cast = mb.cast(x=new, dtype=types.builtin_to_string(op.outputs[0].dtype), name=op.name + "_stand_in_cast",
                           before_op=op)
            block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=cast, force_replace=True)
            block.remove_ops([op])
