"""export_mlpackage: HF causal LM → stateful iOS18 mlpackage, compressed weights carried bit for bit.

Steps: wrap the model in `StatefulCausalLM` (KV cache in float16 buffers, fused SDPA), trace and
convert it to a pymil program with ``k_cache``/``v_cache`` states while every 2-D+ weight is a
stand-in that costs no memory (`standins`), put the real weights in (float16 consts, or constexpr
ops built from the CompressedWeights: `weights.swap_stand_ins`), save to a temporary package in a
hidden folder next to `out_path` (`outputs.scratch_directory`, where coremltools' own temporary
files go too) and rename it into place. Peak memory: the weights as loaded (compressed codes, float16
tensors) plus coremltools' own, never a dense copy of the model; the weight file is written without
copies of the float16 consts, and codes parked in a `Spill` come into memory one layer at a time
(`blob_writer`).

Program interface (every function):
    inputs   input_ids   [1, q_len] int32
             causal_mask [1, 1, q_len, past + q_len] float16, additive (0 / -inf)
    states   k_cache, v_cache [layers, 1, kv_heads, context, head_dim] float16
    outputs  logits [1, q_len, vocab] float16 ([1, 1, vocab] with last_logits_only)
Single function ``main`` takes any q_len in [1, context]; multifunction packages hold ``prefill``
(q_len = prefill_length) and ``decode`` (q_len = 1) sharing one copy of the weights.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError
from ..formats import CompressedWeight
from ..outputs import os_errors, publish, scratch_directory

log = logging.getLogger(__name__)

STATE_NAMES = ("k_cache", "v_cache")
INPUT_NAMES = ("input_ids", "causal_mask")


def export_mlpackage(
    model: torch.nn.Module,
    out_path: str | os.PathLike,
    context: int = 512,
    compressed: dict[str, CompressedWeight] | None = None,
    multifunction: bool = False,
    last_logits_only: bool = False,
    metadata: dict | None = None,
    prefill_length: int = 64,
    spill=None,
) -> dict:
    """Export `model` to `out_path` (.mlpackage); returns a report.

    compressed: HF module name (``model.layers.0.self_attn.q_proj``, ``lm_head``) → CompressedWeight;
        these weights are stored as constexpr ops decoding to exactly ``cw.dequantize()``.
    metadata: extra user-defined metadata (e.g. ``{"recipe": {...}}``); non-string values are JSON.
    spill: the `layerwise.spill.Spill` the compressed codes, masks and values are parked in, if any:
        what the program derives from them is parked there too (`weights`), and their pages are
        dropped again as each is written (`blob_writer`).
    Report: path, seconds, size_bytes, functions, ops (MIL op types), compressed (op type counts).
    """
    import coremltools as ct

    from .blob_writer import lean_writer

    start = time.perf_counter()
    out_path = Path(out_path)
    _check_arguments(out_path, context, multifunction, prefill_length)
    compressed = dict(compressed or {})
    # the package, coremltools' temporary packages and a multifunction export's parts: all in one
    # hidden folder beside out_path, gone when this ends (or, after a SIGKILL, at the next export)
    with scratch_directory(out_path) as scratch:
        programs, wrapper, kinds = _programs(ct, model, context, compressed, prefill_length if multifunction else None,
                                             last_logits_only, spill)
        ops = sorted({op.op_type for prog in programs.values() for op in _all_ops(prog)})
        missing = [op for op in wrapper.required_ops() if op not in ops]
        if missing:
            raise ModelError(f"the converted program lacks {missing}; the export would not be stateful/fused")
        info = _package_info(wrapper, list(programs), context, compressed, last_logits_only,
                             prefill_length if multifunction else None, metadata)
        package = scratch / out_path.name
        with os_errors(out_path), lean_writer(spill):
            _save(ct, programs, info, package)
        publish(package, out_path)  # an mlpackage is recognised as ours by its layerwise.* metadata
    report = {
        "path": str(out_path),
        "seconds": round(time.perf_counter() - start, 3),
        "size_bytes": package_bytes(out_path),
        "functions": list(programs),
        "ops": ops,
        "compressed": kinds,
    }
    log.info("exported %s: %d bytes in %.1f s", out_path, report["size_bytes"], report["seconds"])
    return report


def _check_arguments(out_path: Path, context: int, multifunction: bool, prefill_length: int) -> None:
    if out_path.suffix != ".mlpackage":
        raise ModelError(f"{out_path} must end in .mlpackage")
    if context < 3:
        raise ModelError(f"context={context} is too short; use at least 3 tokens")
    if multifunction and not 1 <= prefill_length <= context:
        raise ModelError(f"prefill_length={prefill_length} must lie in [1, context={context}]")


def _programs(ct, model, context: int, compressed: dict[str, CompressedWeight], prefill_length: int | None,
              last_logits_only: bool, spill) -> tuple[dict, torch.nn.Module, dict[str, int]]:
    """Trace and convert once per function while every weight is a stand-in, then put the real ones in.
    Returns the programs by function name, the wrapper, and the MIL op type producing each compressed
    weight → count."""
    from ..models.stateful import StatefulCausalLM
    from .standins import StandIns, held_weights, standing_in
    from .weights import swap_stand_ins

    held = held_weights(model)
    values = _exported_values(model, held, compressed)
    shapes = _function_shapes(ct, context, prefill_length)
    programs = {}
    stand_ins = StandIns(set(held))
    with standing_in(model, held), torch.no_grad():
        wrapper = StatefulCausalLM(model, context, torch.float16, last_logits_only).eval()
        traced = _trace(wrapper)
        for fn, (ids_shape, mask_shape) in shapes.items():
            programs[fn] = _convert(ct, traced, wrapper, ids_shape, mask_shape, stand_ins)
    del traced
    kinds: dict[str, int] = {}
    for i, prog in enumerate(programs.values()):
        for op_type in swap_stand_ins(prog, stand_ins, values, spill=spill).values():
            kinds[op_type] = kinds.get(op_type, 0) + (i == 0)
    return programs, wrapper, kinds


def _package_info(wrapper, functions: list[str], context: int, compressed: dict, last_logits_only: bool,
                  prefill_length: int | None, metadata: dict | None) -> dict[str, str]:
    """The package's user-defined metadata: the program interface, then the caller's `metadata`."""
    info = {
        "layerwise.context": str(context),
        "layerwise.state_names": ",".join(STATE_NAMES),
        "layerwise.state_shape": json.dumps(list(wrapper.state_shape)),
        "layerwise.input_names": ",".join(INPUT_NAMES),
        "layerwise.functions": ",".join(functions),
        "layerwise.last_logits_only": str(last_logits_only).lower(),
        "layerwise.compressed_layers": str(len(compressed)),
        **wrapper.export_metadata(),
    }
    if prefill_length is not None:
        info["layerwise.prefill_length"] = str(prefill_length)
    for key, value in (metadata or {}).items():
        info[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return info


def package_bytes(path: str | os.PathLike) -> int:
    """Total size of the files in a package directory (apparent bytes, like `du -b`)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _function_shapes(ct, context: int, prefill_length: int | None) -> dict:
    """function name → (input_ids shape, causal_mask shape) as coremltools shapes."""
    if prefill_length is None:
        q = ct.RangeDim(1, context)
        return {"main": ((1, q), (1, 1, q, ct.RangeDim(1, context)))}
    return {
        "prefill": ((1, prefill_length), (1, 1, prefill_length, ct.RangeDim(prefill_length, context))),
        "decode": ((1, 1), (1, 1, 1, ct.RangeDim(1, context))),
    }


def _trace(wrapper) -> torch.jit.ScriptModule:
    """Trace with q_len 2 after a 1-token past: a 1-token example would bake in q_len == 1."""
    ids = torch.zeros(1, 2, dtype=torch.int32)
    mask = torch.zeros(1, 1, 2, 3, dtype=torch.float32)
    traced = torch.jit.trace(wrapper, (ids, mask), check_trace=False)
    wrapper.reset_cache()  # tracing ran one forward: leave no keys/values behind
    return traced


def _convert(ct, traced, wrapper, ids_shape, mask_shape, stand_ins):
    """Traced wrapper → pymil Program (float16, iOS18, two states) for one input geometry."""
    from .standins import converting, pipeline

    state = ct.TensorType(shape=wrapper.state_shape, dtype=np.float16)
    with converting(stand_ins):
        return ct.convert(
            traced,
            inputs=[
                ct.TensorType(INPUT_NAMES[0], shape=ids_shape, dtype=np.int32),
                ct.TensorType(INPUT_NAMES[1], shape=mask_shape, dtype=np.float16),
            ],
            outputs=[ct.TensorType("logits", dtype=np.float16)],
            states=[ct.StateType(wrapped_type=state, name=name) for name in STATE_NAMES],
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            convert_to="milinternal",
            pass_pipeline=pipeline(),
        )


def _save(ct, programs: dict, info: dict[str, str], path: Path) -> None:
    """Write the program(s) as one package at `path`; several functions share one weight file."""
    def finish(prog):
        return ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            pass_pipeline=ct.PassPipeline.EMPTY,
            skip_model_load=True,
        )

    if list(programs) == ["main"]:
        mlmodel = finish(programs["main"])
        mlmodel.user_defined_metadata.update(info)
        mlmodel.save(str(path))
        _serialize_deterministically(path)
        return
    parts = path.parent / "functions"  # beside `path`: in the caller's scratch folder
    parts.mkdir()
    desc = ct.utils.MultiFunctionDescriptor()
    for fn, prog in programs.items():
        part = str(parts / f"{fn}.mlpackage")
        finish(prog).save(part)
        desc.add_function(part, "main", fn)
    desc.default_function_name = "decode"
    merged = str(parts / "merged.mlpackage")
    ct.utils.save_multifunction(desc, merged)  # deduplicates the weights across functions
    mlmodel = ct.models.MLModel(merged, skip_model_load=True)
    mlmodel.user_defined_metadata.update(info)
    mlmodel.save(str(path))
    _serialize_deterministically(path)


def _serialize_deterministically(package: Path) -> None:
    """Rewrite the package's program with protobuf's deterministic map order: coremltools' own save
    orders the metadata map by Python's string hashing, so the same export differed between processes."""
    from coremltools.proto import Model_pb2

    program = Path(package) / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(program.read_bytes())
    program.write_bytes(spec.SerializeToString(deterministic=True))


def _exported_values(model, held: dict[str, torch.Tensor], compressed: dict[str, CompressedWeight]) -> dict:
    """Parameter name → what is exported for it: the tensor, or (module name, CompressedWeight) for
    a compressed module's weight and every name tied to it (the frontend names a tied weight once)."""
    values: dict = dict(held)
    by_tensor = {}
    for name, cw in compressed.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise ModelError(f"compressed weight {name!r} names no module with a weight") from None
        if tuple(weight.shape) != cw.shape:
            raise ModelError(f"{name}: compressed shape {cw.shape} != weight {tuple(weight.shape)}")
        by_tensor[id(weight)] = (name, cw)
    for param, tensor in held.items():
        if id(tensor) in by_tensor:
            values[param] = by_tensor[id(tensor)]
    return values


def cpu_float32(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself when it is float32 on the CPU, else a CPU float32 copy (the user's stays as is)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model
    log.info("tracing a CPU float32 copy of the model (it holds other dtypes or devices)")
    return copy.deepcopy(model).to("cpu", torch.float32)


def _all_ops(prog):
    for fn in prog.functions.values():
        yield from fn.operations
