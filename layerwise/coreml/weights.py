"""Hand CompressedWeights to Core ML as iOS18 constexpr ops, bit for bit.

The converter never fits a palette or a scale here: the program is converted with the dense
float16 weights (``cw.dequantize()``), then `compress_program` swaps each such ``const`` for the
constexpr op(s) that decode the checkpoint's own codes, scales, zero points, LUTs and masks:

    affine            constexpr_blockwise_shift_scale(data=uint4|uint8 codes, scale, offset=zero point)
    affine, symmetric constexpr_blockwise_shift_scale(data=int4|int8 codes − 2**(bits−1), scale), no offset
    affine, 3-bit-ish per-channel grid where an LUT is smaller:
                      constexpr_lut_to_dense(indices=uintN, lut=[out, 1, 2**N, 1] = scale*(k - zp))
    lut               constexpr_lut_to_dense(indices=uintN, lut=[out/g_out, in/g_in, 2**N, 1])
    lut, int8 LUT     lut = constexpr_blockwise_shift_scale(data=lut_codes, scale=lut_scale)
    any + mask        constexpr_sparse_blockwise_shift_scale / constexpr_lut_to_sparse / plain
                      nonzero values, then constexpr_sparse_to_dense(nonzero_data, mask=uint1)
    dense, no mask    left as the float16 const

Every decode is the same float16 arithmetic as `CompressedWeight.dequantize` (an exact integer
step times a float16 scale, rounded once), so the program holds the checkpoint's numbers.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

from ..errors import ModelError
from ..formats import CompressedWeight
from .layout import affine_lut_is_smaller, index_bits

log = logging.getLogger(__name__)



def compress_program(
    prog, compressed: dict[str, CompressedWeight], function: str = "main"
) -> dict[str, str]:
    """Replace the float16 weight const of every compressed module by its constexpr decode.

    prog: pymil Program (converted with the dense ``cw.dequantize()`` weights).
    compressed: HF module name (e.g. ``model.layers.0.mlp.up_proj``) → CompressedWeight.
    Returns module name → MIL op type that now produces its weight.
    A const is matched by exact float16 value and shape; a module whose weight is not found
    (e.g. the model did not hold ``cw.dequantize()`` when traced) raises ModelError.
    """
    with mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=["layerwise_compress"])):
        done = _swap_consts(prog.functions[function], compressed)
    log.info("compressed %d weights in function %r: %s", len(done), function, _summary(done))
    return done


def _swap_consts(block, compressed: dict[str, CompressedWeight]) -> dict[str, str]:
    """Find each weight's const by (shape, exact bits) and rewire its users to the constexpr."""
    consts: dict[tuple, list] = {}
    for op in block.operations:
        val = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(val, np.ndarray) and val.dtype == np.float16 and val.ndim == 2:
            consts.setdefault(_key(val), []).append(op)
    swapped: dict[int, object] = {}  # id(const op) → its constexpr Var (identical weights share one)
    done: dict[str, str] = {}
    for name, cw in compressed.items():
        dense = _np(cw.dequantize())
        ops = [op for op in consts.get(_key(dense), []) if _same(op, dense, swapped)]
        if not ops:
            raise ModelError(
                f"the weight of {name} {tuple(cw.shape)} is not in the converted program with its "
                "compressed values; load cw.dequantize() into the model before exporting"
            )
        if cw.scheme == "dense" and cw.mask is None:
            done[name] = "const"
            continue
        for op in ops:
            if id(op) not in swapped:
                with block:
                    new = constexpr_weight(cw, name=_op_name(name), before_op=op)
                block.replace_uses_of_var_after_op(
                    anchor_op=op, old_var=op.outputs[0], new_var=new, force_replace=True
                )
                block.remove_ops([op])
                swapped[id(op)] = new
            done[name] = swapped[id(op)].op.op_type
    return done


def _same(op, dense: np.ndarray, swapped: dict) -> bool:
    """The const `op` (possibly swapped already) holds exactly `dense`, bit for bit."""
    if id(op) in swapped:
        return True
    return np.array_equal(op.outputs[0].val.view(np.uint16), dense.view(np.uint16))


def constexpr_weight(cw: CompressedWeight, name: str, before_op=None):
    """Build (inside an active MIL block) the constexpr ops decoding `cw` → Var fp16 [out, in]."""
    kw = {"before_op": before_op} if before_op is not None else {}
    mask = None if cw.mask is None else _np(cw.mask)
    if cw.scheme == "affine" and affine_lut_is_smaller(cw):
        return _lut(cw, _affine_grid(cw), mask, name, kw)
    if cw.scheme == "affine":
        bits = 4 if cw.bits <= 4 else 8
        codes, tag = _np(cw.codes), _uint
        shift = {"scale": _np(cw.scale)}
        if cw.midpoint_zero:  # signed codes around 0: no offset tensor to store
            codes, tag = codes.astype(np.int16) - 2 ** (cw.bits - 1), _int
        else:
            shift["offset"] = _uint(_np(cw.zero_point), bits)
        if mask is None:
            return mb.constexpr_blockwise_shift_scale(data=tag(codes, bits), name=name, **shift, **kw)
        m, nz = mb.constexpr_sparse_blockwise_shift_scale(
            data_mask=_uint(mask, 1), nonzero_data=tag(codes[mask], bits), name=name + "_sparse", **shift, **kw
        )
        return mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=m, name=name, **kw)
    if cw.scheme == "lut":
        if cw.lut_codes is not None:
            n_out, n_in, k = cw.lut.shape
            decoded = (cw.lut_codes.float() * cw.lut_scale.float()).to(torch.float16)
            if not torch.equal(decoded.view(torch.int16), cw.lut.view(torch.int16)):
                raise ModelError(f"{name}: lut != lut_scale * lut_codes; the int8 LUT would decode differently")
            lut = mb.constexpr_blockwise_shift_scale(
                data=_np(cw.lut_codes).reshape(n_out, n_in, k, 1),
                scale=_np(cw.lut_scale).reshape(n_out, n_in, 1, 1),
                name=name + "_lut", **kw,
            )
            return _lut(cw, lut, mask, name, kw)
        return _lut(cw, _np(cw.lut), mask, name, kw)
    values = (_np(cw.values) + np.float16(0)).astype(np.float16)  # dense + mask
    return mb.constexpr_sparse_to_dense(
        nonzero_data=values[mask], mask=_uint(mask, 1), name=name, **kw
    )


def _lut(cw: CompressedWeight, lut, mask, name: str, kw: dict):
    """lut: np [n_out, n_in, 2**bits] float16, or a Var [n_out, n_in, 2**bits, 1] (quantized LUT)."""
    bits = index_bits(cw.bits)
    if isinstance(lut, np.ndarray):
        pad = 2**bits - lut.shape[-1]  # 5/7-bit tables ride in 6/8-bit indices; padding never indexed
        lut = np.pad(lut + np.float16(0), ((0, 0), (0, 0), (0, pad)))[..., None].astype(np.float16)
    elif bits != cw.bits:
        raise ModelError(f"a quantized {cw.bits}-bit LUT has no Core ML index type; use 1/2/3/4/6/8 bits")
    if mask is None:
        return mb.constexpr_lut_to_dense(indices=_uint(_np(cw.codes), bits), lut=lut, name=name, **kw)
    m, nz = mb.constexpr_lut_to_sparse(
        indices_mask=_uint(mask, 1),
        indices_nonzero_data=_uint(_np(cw.codes)[mask], bits),
        lut=lut,
        name=name + "_sparse",
        **kw,
    )
    return mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=m, name=name, **kw)


def _affine_grid(cw: CompressedWeight) -> np.ndarray:
    """A per-channel affine grid as a LUT [out, 1, 2**bits]: entry k = fp16(scale * (k - zp))."""
    steps = torch.arange(2**cw.bits, dtype=torch.float32) - cw.zero_point.float()[..., None]
    return _np((steps * cw.scale.float()[..., None]).to(torch.float16))


def _uint(a: np.ndarray, bits: int) -> np.ndarray:
    """Integer array → numpy array tagged with MIL's uint{bits} (sub-byte types are packed on save)."""
    dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{bits}"))
    return np.ascontiguousarray(a).astype(np.uint8).astype(dtype)


def _int(a: np.ndarray, bits: int) -> np.ndarray:
    """Signed integer array → numpy array tagged with MIL's int{bits}."""
    dtype = types.nptype_from_builtin(types.string_to_builtin(f"int{bits}"))
    return np.ascontiguousarray(a).astype(np.int8).astype(dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _key(val: np.ndarray) -> tuple:
    return val.shape, hash(np.ascontiguousarray(val).view(np.uint16).tobytes())


def _op_name(module: str) -> str:
    return module.replace(".", "_") + "_weight"


def _summary(done: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for op_type in done.values():
        counts[op_type] = counts.get(op_type, 0) + 1
    return ", ".join(f"{n}× {t}" for t, n in sorted(counts.items()))
